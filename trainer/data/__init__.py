"""Instruction data, from a file or hub dataset to the batches a step trains on.

    formats.py    reading files and hub datasets into validated rows; bad rows named by file and row
    encoding.py   rows -> token ids with labels: templates, chat turns, BOS/EOS, the length policy
    pipeline.py   all datasets: read, tokenise, check, split train/held-out, weight (`build_datasets`)
    building.py   one dataset read a chunk at a time and tokenised on all cores into its store
    store.py      tokenised examples on disk, memory-mapped; train/held-out sets as index arrays (`Examples`)
    cache.py      where stores live, keyed by everything they depend on
    stats.py      label checks and the per-dataset table printed before training
    leakage.py    held-out questions repeated in the training rows
    batching.py   padded batches (`collate`) and the seeded order examples are seen in (`BatchPlan`)
    packing.py    several examples per row, each attending only to itself
    tasks.py      the built-in task dataset (`builtin:tasks`)
"""
