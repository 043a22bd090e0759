"""glibc malloc settings for the training process, applied by re-executing it once at start-up.

A training step allocates and frees activation buffers of a few MB among many small allocations
(tensor and autograd bookkeeping). glibc's per-thread cache (tcache) keeps freed small blocks out of
the heap's free lists, so they stay pinned between the big free buffers, which then cannot merge:
the next step's activations grow the heap instead of reusing it. Measured on the CPU benchmark job:
peak RSS about 10% lower with the cache off, at the same step time. Heap memory is also kept for
reuse (not returned to the kernel and faulted back in every step): the mmap threshold is fixed at
glibc's own dynamic maximum, and the top of the heap is trimmed only above 1 GiB.

Tunables are read when a process starts, so `apply()` re-executes the same command line with
GLIBC_TUNABLES set (same process id, so launchers keep tracking it). Nothing happens when
GLIBC_TUNABLES already names a malloc setting (yours win), with QLORA_TRAINER_MALLOC=default, or
off glibc.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=33554432"
            ":glibc.malloc.trim_threshold=1073741824")
OPT_OUT = "QLORA_TRAINER_MALLOC"
MARKER = "QLORA_TRAINER_MALLOC_SET"


def tunables_for(environ: dict[str, str]) -> str | None:
    """The GLIBC_TUNABLES value to re-execute with, or None to leave the process as it is."""
    if environ.get(OPT_OUT) == "default" or environ.get(MARKER):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None
    return f"{current}:{TUNABLES}" if current else TUNABLES


def apply() -> None:
    """Call first thing in a launch script, before torch is imported."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    value = tunables_for(os.environ)
    if value is None:
        return
    os.environ["GLIBC_TUNABLES"] = value
    os.environ[MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
