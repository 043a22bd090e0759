"""Instruction data, from a file or hub dataset to the batches a step trains on.

    sources.py                finding files and hub datasets, reading their records a chunk at a time if need be
    formats.py                records -> validated rows: the format, column mapping; bad rows named by file, row
    encoding.py               rows -> token ids with labels: each row's pieces tokenised and laid out as an example
    instruction_templates.py  alpaca, plain and custom prompts, as pieces a cut keeps well formed
    chat_templates.py         chat rows rendered turn by turn and cut into trained, prompt and markup pieces
    tokenizer_checks.py       EOS, a pad distinct from it, and whether BOS starts a document or marks a turn
    examples.py               one example: BOS + pieces + EOS, masked labels, the length policy; `Example`
    pipeline.py               all datasets: read, tokenise, check, split train/held-out, weight
    building.py               one dataset read a chunk at a time and tokenised on all cores into its store
    store.py                  tokenised examples on disk, memory-mapped; train/held-out sets as index arrays
    cache.py                  where stores live, keyed by everything they depend on
    stats.py                  label checks and the per-dataset table printed before training
    leakage.py                held-out questions repeated in the training rows
    batching.py               padded batches (`collate`) and the seeded order examples are seen in (`BatchPlan`)
    packing.py                several examples per row, each attending only to itself
    tasks.py                  the built-in task dataset (`builtin:tasks`)
"""
