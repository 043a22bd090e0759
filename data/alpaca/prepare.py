"""Stanford Alpaca's 52k instructions (tatsu-lab/alpaca, CC BY-NC 4.0), or any Alpaca-form file,
as validated Alpaca rows: instruction, input and output kept, other columns (the hub's `text`) left out.

    python data/alpaca/prepare.py                             # the hub
    python data/alpaca/prepare.py --source alpaca_data.json   # a local copy of the original release

Writes data/alpaca/alpaca.jsonl.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: `data` is importable from the repository root
    sys.path.insert(0, str(ROOT))
from data import prepare_common  # noqa: E402

HUB_ID = "tatsu-lab/alpaca"
OUT = Path(__file__).resolve().parent / "alpaca.jsonl"


def to_alpaca(record: dict[str, Any]) -> dict[str, str]:
    return prepare_common.alpaca(record)


def main(argv: list[str] | None = None) -> int:
    return prepare_common.main(__doc__, to_alpaca, HUB_ID, OUT, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
