"""Databricks Dolly 15k (databricks/databricks-dolly-15k, CC BY-SA 3.0) as Alpaca rows:
instruction -> instruction, context -> input (often empty), response -> output; the category is left out.

    python data/dolly/prepare.py                                          # the hub
    python data/dolly/prepare.py --source databricks-dolly-15k.jsonl      # a local copy of its file

Writes data/dolly/dolly.jsonl.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: `data` is importable from the repository root
    sys.path.insert(0, str(ROOT))
from data import prepare_common  # noqa: E402

HUB_ID = "databricks/databricks-dolly-15k"
OUT = Path(__file__).resolve().parent / "dolly.jsonl"


def to_alpaca(record: dict[str, Any]) -> dict[str, str]:
    return prepare_common.alpaca(record, input="context", output="response")


def main(argv: list[str] | None = None) -> int:
    return prepare_common.main(__doc__, to_alpaca, HUB_ID, OUT, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
