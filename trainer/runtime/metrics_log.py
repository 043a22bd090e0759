"""`<output_dir>/metrics.jsonl`: one JSON object per line, flushed as written (nothing lost on a crash)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.runtime import distributed


class MetricsLog:
    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self._handle = None
        if distributed.is_main():
            output_dir.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
