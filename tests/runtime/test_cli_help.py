"""`--help` on a launch script shows its commands and its flags and exits 0; an unknown flag is still an
error, and so is --dry-run where the script has none."""
from __future__ import annotations

from conftest import run_cli


def test_help_shows_the_scripts_usage_and_exits_0():
    shown = run_cli(["launch/train.py", "--help"], timeout=120)
    assert "Train a LoRA adapter" in shown.stdout and "--dry-run" in shown.stdout and "recipes/*.yaml" in shown.stdout
    evaluation = run_cli(["launch/eval.py", "-h"], timeout=120).stdout
    assert "Evaluate an adapter" in evaluation and "--debug" in evaluation and "--dry-run" not in evaluation
    # eval, chat and export have no dry run: the flag is refused, not ignored with the whole evaluation run
    refused = run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", "adapter=none", "--dry-run"], timeout=120,
                      check=False)
    assert refused.returncode == 2 and "unknown flag --dry-run; known flags: --debug" in refused.stderr
    unknown = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "--hlep"], timeout=120, check=False)
    assert unknown.returncode == 2 and "unknown flag --hlep" in unknown.stderr + unknown.stdout
