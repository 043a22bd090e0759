"""Rank-deficiency analysis of trained LoRA adapters (issue 9).

python launch/analyze.py <adapter dir> [<second adapter dir>] [out=<dir>] [threshold=0.9] [base=<dir>] [seed=0]
"""
import sys
from pathlib import Path

# Run as a script from a checkout, `trainer` is importable only with the repo root on the path.
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from trainer.analysis import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
