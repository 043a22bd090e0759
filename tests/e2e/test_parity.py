"""launch/parity.py end to end on the tiny base: both frameworks train 2 steps and are scored on
the same held-out examples. The real comparison (SmolLM2-135M, 50 steps) is `make parity`."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_parity_prints_both_curves_on_the_tiny_base(tiny_base, tmp_path):
    out = tmp_path / "parity"
    result = subprocess.run(
        [sys.executable, "launch/parity.py", "--base", "builtin:tiny-llama", "--data", "builtin:tasks",
         "--steps", "2", "--eval-every", "1", "--eval-rows", "8", "--global-batch", "4", "--micro-batch", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(3):
        assert f"\n| {step} | " in result.stdout
    results = json.loads((out / "results.json").read_text())["results"]
    ours, theirs = results["ours"], results["theirs"]
    assert sorted(ours["held_out"]) == sorted(theirs["held_out"]) == ["0", "1", "2"]
    # Before training both score the same base on the same examples, and the first step's loss is
    # the base's too (LoRA's B starts at zero): equal up to float rounding and Trainer's 4 decimals.
    assert ours["held_out"]["0"]["eval_tokens"] == theirs["held_out"]["0"]["eval_tokens"]
    assert ours["held_out"]["0"]["eval_loss"] == pytest.approx(theirs["held_out"]["0"]["eval_loss"], rel=1e-4)
    assert ours["train_loss"]["1"] == pytest.approx(theirs["train_loss"]["1"], abs=1e-4)
