"""Run health: faults end with a clear message and a resumable state, never a silent death.

- Non-finite loss or gradient norm: detected every step on all ranks together (the loss rides on
  the step's one all-reduce). Default: stop, naming the step, the learning rate and the rows.
  `train.on_nonfinite=skip`: undo the update from an in-memory snapshot and go on, stopping after
  `train.max_consecutive_skips` skips in a row.
- Out of memory: a message with the numbers and the levers this framework has.
"""
from __future__ import annotations

import math

import torch

from trainer.runtime import distributed


class TrainingHealthError(RuntimeError):
    """Training cannot go on; the message says why and what to do. Checkpoints are left intact."""


def is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def nonfinite_message(step: int, lr: float, loss: float, grad_norm: float | None,
                      rows_by_file: list[tuple[str, list[int]]], skips: int | None = None,
                      checkpoint: str | None = None) -> str:
    """`rows_by_file`: the batch's rows (0-based) in each file they came from (data/pipeline.py
    `rows_by_file`: a mixture's datasets each number their own rows). `skips`: in skip mode, the steps
    skipped in a row before this one. `checkpoint`: the newest complete checkpoint, None if none."""
    def listed(rows: list[int]) -> str:
        return ", ".join(str(r + 1) for r in sorted(set(rows))[:32])

    what = f"loss {loss}" + (f", gradient norm {grad_norm}" if grad_norm is not None else "")
    tail = (f" after {skips} consecutive skipped steps (train.max_consecutive_skips)" if skips is not None else "")
    if len(rows_by_file) == 1:
        (name, rows), = rows_by_file
        where = f"The batch held rows {listed(rows)} of {name} (1-based)."
    else:
        where = "The batch held these rows (1-based): " + "; ".join(
            f"{name}: row{'s' if len(set(rows)) > 1 else ''} {listed(rows)}" for name, rows in rows_by_file) + "."
    levers = ("inspect those rows, lower train.learning_rate, or set train.on_nonfinite=skip" if skips is None
              else "inspect those rows, lower train.learning_rate, or raise train.max_consecutive_skips")
    then = (f"The last complete checkpoint, {checkpoint}, is untouched; resume with resume=auto after fixing the "
            f"cause ({levers})." if checkpoint is not None else
            f"No checkpoint was saved before this step: fix the cause ({levers}) and train again from the start.")
    return f"non-finite training values at step {step} (learning rate {lr:.3g}): {what}{tail}.\n{where}\n{then}"


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_message(error: BaseException, step: int) -> str:
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        numbers = (f"GPU {device}: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated, "
                   f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB of {total / 2**30:.2f} GiB")
    else:
        import psutil

        memory = psutil.virtual_memory()
        rss = psutil.Process().memory_info().rss
        numbers = (f"host: this rank uses {rss / 2**30:.2f} GiB, {memory.available / 2**30:.2f} GiB available "
                   f"of {memory.total / 2**30:.2f} GiB")
    return (f"out of memory at step {step} on rank {distributed.rank()} ({numbers}).\n"
            f"Levers, cheapest first: lower train.micro_batch_size (the global batch stays, accumulation "
            f"grows); lower data.max_seq_len; train.activation_checkpointing=true; quant.bits=4; "
            f"deepspeed.zero_stage=3 (partitions the base); deepspeed.offload_optimizer=true / "
            f"deepspeed.offload_param=true.\nCheckpoints written so far are intact: resume=auto continues.\n"
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
