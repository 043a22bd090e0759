"""`<output_dir>/metrics.jsonl`: one JSON object per line, flushed as written (nothing lost on a crash).
A non-finite number (a skipped step's NaN loss) is written as null: JSON has no NaN, and strict
readers (jq, JavaScript, pandas) refuse the `NaN` Python's json writes by default.

A log that cannot be written (a full disk, its folder moved away) does not stop training: it says so
once (`warn_write_failed`) and writes no more this run. The checkpoint saves decide: one that fails
for want of space stops the run with one message, the previous checkpoint intact.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from trainer.runtime import distributed


def finite(value):
    """`value` with every non-finite float in it, in dicts and lists too, as None (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def close_quietly(handle) -> None:
    """Close a log's file or writer given up after a failed write: it closes even where its flush
    fails again, with that same error, which `warn_write_failed` says once."""
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass


def warn_write_failed(path: str | Path, error: OSError, lost: str) -> None:
    """One warning on stderr for a log given up after `error`. `lost` completes "training goes on, ..."."""
    reason = getattr(error, "strerror", None) or error
    # tqdm.write: the progress bar may hold the current line.
    tqdm.write(f"warning: could not write {path} ({reason}); training goes on, {lost}. The next checkpoint save "
               f"says whether the disk is usable: if it is full, that save stops the run and keeps the previous "
               f"checkpoint (free space, then resume=auto)", file=sys.stderr)


class MetricsLog:
    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self._handle = None
        if distributed.is_main():
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.path, "a", encoding="utf-8")
            except OSError as error:
                self._give_up(error)

    def write(self, record: dict) -> None:
        if self._handle is None:
            return
        try:
            self._handle.write(json.dumps(finite({**record, "time": round(time.time(), 3)}), allow_nan=False) + "\n")
            self._handle.flush()
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        handle, self._handle = self._handle, None
        close_quietly(handle)
        warn_write_failed(self.path, error, f"but writes no more lines to {self.path.name} this run (report.png, "
                                            f"drawn from it, ends here)")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # every line was flushed as written: nothing is left to write
            self._handle = None
