"""The real CLI, end to end: `deepspeed --num_gpus 2 launch/train.py recipes/tiny_alpaca.yaml` on 2 CPU
ranks (gloo), a 4-bit base, then PEFT loads the adapter and gives our logits; sample generations in
the log, and checkpoints/best."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _checkpoints import peft_on_4bit_base, tiny_recipe
from conftest import free_port, run_cli
from trainer.checkpoint import resume
from trainer.checkpoint.best import COMPLETE, mark_best_and_prune
from trainer.checkpoint import reading
from trainer.checkpoint.reading import held_out_examples_note
from trainer.data.examples import examples_identity
from trainer.evaluation.eval_command import evaluation_rows
from trainer.recipe_loading import recipe_from_dict
from trainer.model.lora import apply_lora
from trainer.model.base import load_base, load_tokenizer, resolve_base

SHORT = ["train.max_steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.save_every=3",
         "train.log_every=1", "data.max_eval_rows=32"]


def train_2_ranks(output_dir: Path, *overrides: str):
    return run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                    "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *SHORT, *overrides])


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_base) -> Path:
    output_dir = tmp_path_factory.mktemp("zero2")
    result = train_2_ranks(output_dir, "deepspeed.zero_stage=2")
    (output_dir / "train.log").write_text(result.stdout)
    return output_dir


@pytest.mark.distributed
def test_two_rank_zero2_run_learns_and_writes_metrics_and_checkpoints(zero2_run, tiny_base):
    metrics = read_metrics(zero2_run)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    for step in (3, 6):
        directory = zero2_run / "checkpoints" / f"step-{step}"
        assert (directory / "adapter_config.json").is_file() and (directory / "COMPLETE").is_file()
        assert (directory / "meta.json").is_file() and (directory / "recipe.yaml").is_file()
    adapter_bytes = (zero2_run / "checkpoints/step-6/adapter_model.safetensors").stat().st_size
    mask = os.umask(0)
    os.umask(mask)  # the files are readable as the umask allows (safetensors alone writes 0600)
    assert {p.stat().st_mode & 0o777 for p in (zero2_run / "checkpoints/step-6").iterdir()} == {0o666 & ~mask}
    base_bytes = sum(p.stat().st_size for p in tiny_base.glob("*.safetensors"))
    assert adapter_bytes < base_bytes / 4, (adapter_bytes, base_bytes)
    config = json.loads((zero2_run / "checkpoints/step-6/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 16
    assert not list((zero2_run / "checkpoints").glob(".tmp-*"))
    # The eval loss fell, so the best checkpoint is the last one; the link is relative.
    best = zero2_run / "checkpoints" / "best"
    assert best.is_symlink() and str(best.readlink()) == "step-6" and (best / "COMPLETE").is_file()
    assert json.loads((best / "meta.json").read_text())["eval_loss"] == evals[1]
    assert json.loads((zero2_run / "checkpoints/step-3/meta.json").read_text())["eval_loss"] == evals[0]


@pytest.mark.distributed
def test_sample_generations_are_printed_once_and_logged_at_the_end(zero2_run):
    # train.sample_every is 50 in the tiny recipe: a 6-step run samples at the end only.
    samples = [json.loads(line) for line in (zero2_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6, 6, 6]
    assert all({"instruction", "input", "reference", "prediction"} <= set(s) for s in samples)
    log = (zero2_run / "train.log").read_text()
    assert log.count("samples at step 6 (greedy, held-out):") == 1  # rank 0 prints, both ranks decode
    assert "  [3] question:" in log and "      prediction: " in log


def our_model(adapter_dir: Path) -> torch.nn.Module:
    recipe = recipe_from_dict(yaml.safe_load((adapter_dir / "recipe.yaml").read_text()))
    model, _ = load_base(recipe, torch.device("cpu"))
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha, 0.0, recipe.lora.rslora)
    reading.load_into_model(model, adapter_dir)
    return model.eval()


@pytest.mark.distributed
def test_peft_loads_our_adapter_with_no_missing_keys_and_the_same_logits(zero2_run, tiny_base):
    adapter_dir = zero2_run / "checkpoints" / "step-6"
    peft_model = peft_on_4bit_base(tiny_base, adapter_dir)

    ids = torch.tensor([[1, 45, 67, 89, 120, 300, 13, 13, 500]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = our_model(adapter_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_with_a_4bit_base_writes_non_empty_adapter_tensors(tmp_path, tiny_base):
    train_2_ranks(tmp_path, "deepspeed.zero_stage=3", "train.max_steps=3")
    weights = reading.load_adapter_weights(tmp_path / "checkpoints" / "step-3")
    assert len(weights) == 2 * 7 * 4  # A and B, 7 target modules, 4 layers
    for key, tensor in weights.items():
        assert tensor.numel() > 0 and 16 in tensor.shape, key
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    assert torch.isfinite(torch.tensor([m["loss"] for m in read_metrics(tmp_path)])).all()


@pytest.mark.slow
def test_single_process_run_and_plain_resume_continue_the_same_losses(tmp_path, tiny_base):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={straight}", *SHORT])
    # A run stopped after step 3 is the straight run's step-3 checkpoint in a directory of its own.
    shutil.copytree(straight / "checkpoints" / "step-3", stopped / "checkpoints" / "step-3")
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={stopped}", *SHORT, "resume=auto",
             "train.report=false"])
    expected = {m["step"]: m["loss"] for m in read_metrics(straight) if m["step"] > 3}
    resumed = {m["step"]: m["loss"] for m in read_metrics(stopped)}
    assert resumed == expected
    # train.report=false: metrics.jsonl only, no TensorBoard events or report.png.
    if importlib.util.find_spec("matplotlib") and importlib.util.find_spec("tensorboard"):  # the [report] extra
        assert (straight / "report.png").is_file() and (straight / "tensorboard").is_dir()
    assert not (stopped / "report.png").exists() and not (stopped / "tensorboard").exists()
    final_straight = reading.load_adapter_weights(straight / "checkpoints/step-6")
    final_resumed = reading.load_adapter_weights(stopped / "checkpoints/step-6")
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


@pytest.mark.distributed
def test_eval_takes_the_best_link_and_names_its_results_after_the_checkpoint(zero2_run):
    run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={zero2_run / 'checkpoints' / 'best'}",
             f"output_dir={zero2_run}", "eval.max_rows=4", "eval.max_new_tokens=4", "eval.loss=false"])
    metrics = json.loads((zero2_run / "eval" / "step-6" / "metrics.json").read_text())
    assert metrics["adapter_resolved"] == str((zero2_run / "checkpoints" / "step-6").resolve())


@pytest.mark.distributed
def test_eval_notes_held_out_examples_other_than_those_the_run_scored(zero2_run, tmp_path):
    """The run's eval_loss was scored on data.max_eval_rows=32 examples (trainer_state.json's held_out):
    the recipe's own cap scores more of them, a loss not comparable with the run's."""
    adapter = zero2_run / "checkpoints" / "step-6"
    own = tiny_recipe(f"output_dir={zero2_run}", *SHORT)
    tokenizer = load_tokenizer(resolve_base(own), own)
    _, examples = evaluation_rows(own, tokenizer, None, None)
    assert held_out_examples_note(own, adapter, examples_identity(examples)) is None  # training's examples
    result = run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={adapter}", f"out={tmp_path / 'e'}",
                      "eval.max_new_tokens=1", "eval.batch_size=64"])
    assert ("note: the held-out examples scored here are not those step-6's run scored its eval_loss on "
            f"(data.max_eval_rows=32 there, {tiny_recipe().data.max_eval_rows} here)") in result.stdout
    assert "pass data.max_eval_rows=32 to score the same examples" in result.stdout
    note = held_out_examples_note(own, adapter, "0" * 16)  # same settings, other examples
    assert "no data setting differs from its recipe.yaml: the data itself, the tokenizer" in note
    copy = tmp_path / "no-recipe"
    shutil.copytree(adapter, copy)
    (copy / "recipe.yaml").unlink()
    assert "it has no recipe.yaml to compare the data settings with" in held_out_examples_note(own, copy, "0" * 16)


def fake_checkpoint(checkpoints: Path, step: int, eval_loss: float | None) -> Path:
    directory = checkpoints / f"step-{step}"
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    (directory / COMPLETE).write_text("")
    return directory


def test_pruning_keeps_the_best_checkpoint_and_resume_auto_still_takes_the_newest(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        mark_best_and_prune(fake_checkpoint(checkpoints, step, loss), keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-2", "step-3"]
    assert str((checkpoints / "best").readlink()) == "step-2"
    # A checkpoint saved off an evaluation step (no eval loss) is never the best, and a better one moves the link.
    mark_best_and_prune(fake_checkpoint(checkpoints, 4, None), keep_last=1)
    mark_best_and_prune(fake_checkpoint(checkpoints, 5, 0.5), keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-5"]
    assert str((checkpoints / "best").readlink()) == "step-5"
    recipe = recipe_from_dict({"output_dir": str(tmp_path), "resume": "auto"})
    fake_checkpoint(checkpoints, 6, 4.0)
    mark_best_and_prune(checkpoints / "step-6", keep_last=2)
    assert resume.find_resume_dir(recipe) == checkpoints / "step-6"
    assert str((checkpoints / "best").readlink()) == "step-5"

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported")

    monkeypatch.setattr("os.symlink", no_symlinks)
    fake_checkpoint(checkpoints, 7, 0.25)
    mark_best_and_prune(checkpoints / "step-7", keep_last=2)
    assert json.loads((checkpoints / "best.json").read_text()) == {"best": "step-7", "eval_loss": 0.25}
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.json", "step-6", "step-7"]  # no stale link
    assert not list(checkpoints.glob(".tmp-*"))
