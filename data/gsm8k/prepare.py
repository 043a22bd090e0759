"""GSM8K (grade-school maths word problems) as Alpaca rows: question -> instruction, answer -> output.

    python data/gsm8k/prepare.py                              # ../shared's copy if present, else the hub
    python data/gsm8k/prepare.py --source openai/gsm8k --max-rows 1000

From the hub (openai/gsm8k, configuration main) the answer keeps its final "#### <number>" line,
which evaluation reads the final answer from, and loses the calculator annotations ("<<48/2=24>>"):
a model cannot run them, and the text already states each result. A file already in Alpaca form,
such as ../shared/data/gsm8k_train.json (AlpacaDataCleaned's conversion), passes through validated.
Writes data/gsm8k/gsm8k.jsonl.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: `data` is importable from the repository root
    sys.path.insert(0, str(ROOT))
from data import prepare_common  # noqa: E402

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
SHARED_COPY = prepare_common.SHARED_DATA / "gsm8k_train.json"
OUT = Path(__file__).resolve().parent / "gsm8k.jsonl"
CALCULATOR = re.compile(r"<<[^<>]*>>")


def default_source() -> str:
    """../shared's Alpaca copy where this checkout has one (no network needed), else the hub dataset."""
    return str(SHARED_COPY) if SHARED_COPY.is_file() else HUB_ID


def to_alpaca(record: dict[str, Any]) -> dict[str, str]:
    if "question" in record or "answer" in record:
        answer = CALCULATOR.sub("", prepare_common.text(record, "answer"))
        return {"instruction": prepare_common.text(record, "question"), "input": "", "output": answer}
    return prepare_common.alpaca(record)


def main(argv: list[str] | None = None) -> int:
    return prepare_common.main(__doc__, to_alpaca, default_source(), OUT, HUB_CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
