"""Rank-deficiency analysis of trained LoRA adapters (issue 9): spectra, effective ranks, amplification,
and the subspace similarity of two adapters.

    python launch/analyze.py <adapter dir> [<second adapter dir>] [out=<dir>] [threshold=0.9] [base=<dir>] [seed=0]
"""
import sys

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer.analysis import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
