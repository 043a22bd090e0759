"""The project's cache directory, and building something into it once across processes.

Built-in bases and data, GGUF conversions and tokenised datasets all live under `cache_dir()`.
Every rank may ask for the same thing at start-up: `build_once` lets one build it while the
others wait, and readers only ever see a complete directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where built-ins live: $QLORA_TRAINER_CACHE, else ~/.cache/qlora_trainer."""
    override = os.environ.get("QLORA_TRAINER_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "qlora_trainer"


@contextlib.contextmanager
def exclusive(lock_name: str) -> Iterator[None]:
    """Serialise builders across processes: every rank may call ensure_* at start-up."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{lock_name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final: Path, lock_name: str, done: Callable[[], bool], build: Callable[[Path], None],
               marker: str, spec: dict, message: str) -> Path:
    """`final`, built by `build(staging)` unless `done()`: one process at a time (every rank may
    ask at start-up; the others wait and reuse it), into a staging directory renamed into place
    with `marker` (holding `spec`) written last, so readers see nothing or a complete directory."""
    if done():
        return final
    with exclusive(lock_name):
        if done():  # another process built it while we waited
            return final
        # Holding the lock, whatever sits at these paths is debris from a crashed or older build.
        staging = final.parent / f".{final.name}.building"
        for debris in (final, staging):
            shutil.rmtree(debris, ignore_errors=True)
        staging.mkdir(parents=True)
        print(message, flush=True)
        try:
            build(staging)
            (staging / marker).write_text(json.dumps(spec, indent=2) + "\n")
            os.rename(staging, final)  # atomic
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final
