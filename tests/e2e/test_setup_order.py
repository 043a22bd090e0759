"""`setup` runs in the order the user's data flows: tokenizer, data, then the base. A missing data
file or a malformed row is reported before the base is loaded (minutes for a 7B base)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.fixture
def tokenizer_only_base(tmp_path: Path, tiny_base: Path) -> Path:
    """The tiny base's tokenizer without its weights or config: loading this base fails loudly."""
    directory = tmp_path / "tokenizer-only"
    directory.mkdir()
    for file in tiny_base.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, directory / file.name)
    assert not (directory / "config.json").exists() and not list(directory.glob("*.safetensors"))
    return directory


def dry_run(base: Path, data: Path, tmp_path: Path):
    return run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"model.name_or_path={base}",
                    f"data.path={data}", f"output_dir={tmp_path / 'run'}", "data.cache=false", "--dry-run"],
                   check=False)


def test_a_missing_data_file_is_reported_before_the_base_loads(tokenizer_only_base, tmp_path):
    result = dry_run(tokenizer_only_base, tmp_path / "missing.json", tmp_path)
    assert result.returncode != 0
    assert "missing.json: cannot read the data file" in result.stderr
    # The base (which cannot load) was never tried, and no model summary was printed.
    assert "could not load the model" not in result.stderr and "trainable" not in result.stdout


def test_a_malformed_row_is_reported_before_the_base_loads(tokenizer_only_base, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n" + '{"instruction": "x", "output": \n')
    result = dry_run(tokenizer_only_base, data, tmp_path)
    assert result.returncode != 0
    assert "rows.jsonl: row 2" in result.stderr and "not valid JSON" in result.stderr
    assert "could not load the model" not in result.stderr


def test_with_good_data_the_same_base_fails_on_loading(tokenizer_only_base, tmp_path):
    """The control: the tokenizer-only base really cannot load, so the tests above prove the order."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("hi", "yo", "ok")))
    result = dry_run(tokenizer_only_base, data, tmp_path)
    assert result.returncode != 0
    assert "could not load the model" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=32"], "train.global_batch_size=16 is not a multiple of train.micro_batch_size x world "
                                    "size = 32 x 1"),
    (["model.dtype=bfloat16", "deepspeed.zero_stage=0"], "deepspeed.zero_stage=0 with a bfloat16 compute dtype"),
    (["deepspeed.extra.zero_optimization.reduce_bucket_sise=5"],
     "deepspeed.extra.zero_optimization.reduce_bucket_sise: DeepSpeed has no such option; did you mean reduce_bucket_size?"),
], ids=["batch", "zero0-bf16", "extra-typo"])
def test_what_the_recipe_and_world_size_decide_is_refused_before_the_data_is_read(tokenizer_only_base, tmp_path,
                                                                                  overrides, message):
    """Batch sizes and the DeepSpeed config are known from the recipe and the world size: a dry run refuses
    them in one line before reading data (here a missing file) or loading the base, as the run would."""
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"model.name_or_path={tokenizer_only_base}",
                      f"data.path={tmp_path / 'missing.json'}", f"output_dir={tmp_path / 'run'}", "data.cache=false",
                      *overrides, "--dry-run"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: {message}" in result.stderr
    assert "cannot read the data file" not in result.stderr and "could not load the model" not in result.stderr
