"""Rank-deficiency analysis of trained LoRA adapters (issue 9): spectra, effective ranks, amplification,
and the subspace similarity of two adapters. Prints a table per adapter, writes analysis.json and PNG figures.

    python launch/analyze.py runs/tiny_alpaca/checkpoints/step-400 [<second adapter dir>] [out=<dir>]
        [threshold=0.9] [base=<base model dir>] [seed=0] [--debug]

A bad path or option prints one message and exits 2; `--debug` or QLORA_DEBUG=1 shows the traceback instead.
Needs neither DeepSpeed nor a GPU.
"""
import os
import sys
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.analysis.ranks import AnalysisError, analyze
from trainer.analysis.figures import print_report, write_outputs

OPTIONS = ("out", "threshold", "base", "seed")
USAGE = ("usage: python launch/analyze.py <adapter dir> [<second adapter dir>] "
         "[out=<dir>] [threshold=0.9] [base=<base model dir>] [seed=0] [--debug]")


def parse_args(argv: list[str]) -> dict[str, Any]:
    adapters, options = [], {}
    for arg in argv:
        key, has_value, value = arg.partition("=")
        if has_value and key in OPTIONS:
            options[key] = value
        elif has_value and not Path(arg).exists():
            raise AnalysisError(f"unknown option {key}= (valid: {', '.join(OPTIONS)})\n{USAGE}")
        else:
            adapters.append(arg)
    if not 1 <= len(adapters) <= 2:
        raise AnalysisError(f"expected one or two adapter directories, got {len(adapters)}\n{USAGE}")
    try:
        threshold, seed = float(options.get("threshold", 0.9)), int(options.get("seed", 0))
    except ValueError as error:
        raise AnalysisError(f"threshold must be a number and seed an integer: {error}") from None
    if not 0 < threshold <= 1:
        raise AnalysisError(f"threshold must be in (0, 1], got {threshold}")
    out = Path(options["out"]) if "out" in options else Path(adapters[0]) / "analysis"
    return {"paths": adapters, "out": out, "threshold": threshold, "base": options.get("base"), "seed": seed}


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    debug = "--debug" in argv or os.environ.get("QLORA_DEBUG") == "1"
    try:
        args = parse_args([arg for arg in argv if arg != "--debug"])
        report = analyze(args["paths"], args["threshold"], args["base"], args["seed"])
    except AnalysisError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    written = write_outputs(report, args["out"])
    print(f"\nwrote {', '.join(path.name for path in written)} to {args['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
