"""The launch scripts' own helpers: the variants table with missing values, its --only check, its
arguments (overrides without a recipe, a bad recipe in one line) and its runs' output shown and kept, the
demo's --help, and parity's dequantised-base cache keyed by the base's weights."""
from __future__ import annotations

import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import demo  # noqa: E402
import parity  # noqa: E402
import variants  # noqa: E402


def test_the_variants_table_shows_a_dash_where_a_value_is_missing():
    rows = {"lora": {"trainable": "1,843,200", "eval_loss": 0.8631, "exact_match": 0.5, "final_number_accuracy": 0.31,
                     "step_time": 3.2},
            "dora": {"trainable": "1,889,280", "eval_loss": None, "exact_match": 0.25, "final_number_accuracy": None,
                     "step_time": None}}
    lines = variants.table(rows).splitlines()
    assert lines[1].split() == ["lora", "1,843,200", "0.8631", "50.0%", "31.0%", "3.20", "s"]
    assert lines[2].split() == ["dora", "1,889,280", "-", "25.0%", "-", "-"]
    with pytest.raises(SystemExit) as exited:
        variants.main(["--only", "lora,dorra"])
    assert exited.value.code == 2


def test_variants_takes_overrides_without_a_recipe_and_reports_a_bad_recipe_in_one_line(capsys):
    # As launch/demo.py: lora.r=0 is an override on the default recipe (not a recipe path), refused in one line.
    assert variants.main(["lora.r=0", "--ranks", "1"]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"error: {variants.DEFAULT_RECIPE}: lora.r: must be positive") and "Traceback" not in said
    assert variants.main(["recipes/nope.yaml", "lora.r=8"]) == 2
    assert "error: recipe not found: recipes/nope.yaml" in capsys.readouterr().err


def test_variants_shows_each_run_as_it_goes_and_keeps_its_log(tmp_path, capfd):
    command = [sys.executable, "-c", "import sys; print('step 1', flush=True); sys.stderr.write('bar\\r'); sys.exit(3)"]
    code, output = variants.shown_and_logged(command, {}, tmp_path / "run" / "train.log")
    assert code == 3 and output == "step 1\nbar\r"
    assert (tmp_path / "run" / "train.log").read_bytes().decode() == output
    assert capfd.readouterr().out.startswith("step 1\nbar")  # shown, stderr's progress bars included


def test_demo_answers_help_with_its_usage_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(demo.subprocess, "call", lambda *args, **kwargs: pytest.fail("--help started training"))
    for flag in ("--help", "-h"):
        assert demo.main([flag]) == 0
        assert "python launch/demo.py recipes/smollm2_tasks.yaml" in capsys.readouterr().out


def test_two_bases_in_folders_of_one_name_get_their_own_dequantised_copy(tmp_path, tiny_base, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(parity, "cache_dir", lambda: tmp_path / "cache")
    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_base, first)
    shutil.copytree(tiny_base, second)
    weights = next(second.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(key for key in tensors if key.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 3
    save_file(tensors, weights)
    one, other = parity.dequantised_base(str(first)), parity.dequantised_base(str(second))
    assert one != other and parity.dequantised_base(str(first)) == one
    read = lambda directory: load_file(next(directory.glob("*.safetensors")))[name]  # noqa: E731
    assert not torch.allclose(read(one), read(other))


def test_parity_names_a_base_it_cannot_dequantise():
    with pytest.raises(SystemExit, match="--dequantised needs a local base directory"):
        parity.dequantised_base("some-org/not-a-local-dir")
