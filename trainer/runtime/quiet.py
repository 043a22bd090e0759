"""Keep the libraries' routine chatter out of a run's output; `--debug` (or QLORA_DEBUG=1) shows it.

Each silenced line is named here, by the logger that emits it and the start of its message, so a
library's real warnings still get through:
- bitsandbytes (CPU backend) tries to fetch a 4-bit matmul kernel from the hub at import and logs
  "Failed to load CPU gemm_4bit_forward from kernels-community: ..." when it cannot (offline, or
  the kernel repository is not on the trust list; offline, the `kernels` package first logs
  "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' ..."); it then
  uses its built-in kernel, as it always has.
- DeepSpeed logs "Setting accelerator to CPU ..." on every CPU run (the preflight table says what
  the run uses), and its INFO lines; its warnings and errors are kept.
- transformers draws a "Loading weights" progress bar per model load (a 7B load is seconds; the
  bar adds one line per rank) and "Writing model shards" per save. Download bars (huggingface_hub's)
  are kept, and so is the GGUF reader's "Converting and de-quantizing GGUF tensors" (a base's
  one-off conversion, ~20 s, or a .gguf file in chat: long work).
Python warnings: a FutureWarning from our own call into a library is fixed at the call
(trainer/evaluation/generate.py passes the KV cache as transformers 5.25 wants it); one from a
library's call into torch is dropped by its message (QUIET_WARNINGS: DeepSpeed's ZeRO gathers call
`all_gather_into_tensor` and ZeRO-3's gradient partitioning `reduce_scatter_tensor`, which torch 2.13
deprecates, once per rank). Our own are printed as
`warning: ...` lines.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# logger name -> starts of the messages dropped from it
NOISY_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# Loggers whose records below WARNING are dropped (their INFO lines)
INFO_DROPPED = ("DeepSpeed",)
QUIET_BARS = ("Loading weights", "Writing model shards")
# (category, start of the message) of the Python warnings dropped
QUIET_WARNINGS = ((FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
                  (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated"))


class DropNoise(logging.Filter):
    def __init__(self, messages: tuple[str, ...] = (), below: int = 0):
        super().__init__()
        self.messages, self.below = messages, below

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.below:
            return False
        return not str(record.msg).startswith(self.messages)


def install(debug: bool = False) -> None:
    """Drop the lines above (nothing with `debug`). Call before the libraries start logging: the
    filters sit on the loggers by name, so they hold for a library imported later."""
    if debug:
        return
    _plain_own_warnings()
    for category, start in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name in {*NOISY_MESSAGES, *INFO_DROPPED}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise(NOISY_MESSAGES.get(name, ()), logging.WARNING if name in INFO_DROPPED else 0))
    _quiet_bars()


class TrainerWarning(UserWarning):
    """Ours (a resume with a changed setting, say), printed as one `warning: ...` line."""


def _plain_own_warnings() -> None:
    """Our own warnings (TrainerWarning) as one `warning: ...` line, as the commands print their other
    warnings, not Python's "path/loop.py:241: UserWarning: ..." with the source line after it. The
    libraries' warnings keep Python's format, whichever of our lines called them."""
    shown = warnings.showwarning
    if getattr(shown, "plain_own_warnings", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, TrainerWarning):
            return shown(message, category, filename, lineno, file, line)
        rank = os.environ.get("RANK")
        prefix = f"warning (rank {rank}): " if rank not in (None, "0") else "warning: "
        print(prefix + str(message), file=file or sys.stderr, flush=True)

    show.plain_own_warnings = True
    warnings.showwarning = show


def _quiet_bars() -> None:
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    if not hasattr(transformers_logging, "set_tqdm_hook"):  # older transformers: bars stay
        return

    def hook(factory, args, kwargs):
        if str(kwargs.get("desc", "")).startswith(QUIET_BARS):
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)
