"""Adapter-only checkpoints in PEFT's layout, and resuming from them exactly.

    saving.py       writing a checkpoint (crash-safe)
    best.py         the complete checkpoints, the best one (checkpoints/best), pruning old ones
    resume.py       finding, checking and restoring one: adapter, optimizer moments, RNG streams, data cursor
    reading.py      an adapter directory read back: weights into a model, config, meta.json, the base check
    fingerprint.py  the base's fingerprint, so an adapter is never applied to another base
    snapshot.py     the adapter and its Adam state before a step, in memory, to undo a non-finite update
"""
