"""The real CLI, end to end: `deepspeed --num_gpus 2 launch/train.py recipes/tiny_alpaca.yaml` on 2 CPU
ranks (gloo), a 4-bit base, then PEFT loads the adapter and gives our logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port, run_cli
from trainer import resume
from trainer.config import recipe_from_dict
from trainer.lora import apply_lora
from trainer.model import load_base

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
    train_2_ranks(output_dir, "deepspeed.zero_stage=2")
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
    base_bytes = sum(p.stat().st_size for p in tiny_base.glob("*.safetensors"))
    assert adapter_bytes < base_bytes / 4, (adapter_bytes, base_bytes)
    config = json.loads((zero2_run / "checkpoints/step-6/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 16
    assert not list((zero2_run / "checkpoints").glob(".tmp-*"))


def our_model(adapter_dir: Path) -> torch.nn.Module:
    recipe = recipe_from_dict(yaml.safe_load((adapter_dir / "recipe.yaml").read_text()))
    model, _ = load_base(recipe, torch.device("cpu"))
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha, 0.0, recipe.lora.rslora)
    resume.load_into_model(model, adapter_dir)
    return model.eval()


@pytest.mark.distributed
def test_peft_loads_our_adapter_with_no_missing_keys_and_the_same_logits(zero2_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter_dir = zero2_run / "checkpoints" / "step-6"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    # PEFT warns and leaves a B at zero when a key is missing: check every adapter weight arrived.
    saved = resume.load_adapter_weights(adapter_dir)
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)

    ids = torch.tensor([[1, 45, 67, 89, 120, 300, 13, 13, 500]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = our_model(adapter_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_zero3_with_a_4bit_base_writes_non_empty_adapter_tensors(tmp_path, tiny_base):
    train_2_ranks(tmp_path, "deepspeed.zero_stage=3", "train.max_steps=3")
    weights = resume.load_adapter_weights(tmp_path / "checkpoints" / "step-3")
    assert len(weights) == 2 * 7 * 4  # A and B, 7 target modules, 4 layers
    for key, tensor in weights.items():
        assert tensor.numel() > 0 and 16 in tensor.shape, key
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    assert torch.isfinite(torch.tensor([m["loss"] for m in read_metrics(tmp_path)])).all()


def test_single_process_run_and_plain_resume_continue_the_same_losses(tmp_path, tiny_base):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={straight}", *SHORT])
    # A run stopped after step 3 is the straight run's step-3 checkpoint in a directory of its own.
    shutil.copytree(straight / "checkpoints" / "step-3", stopped / "checkpoints" / "step-3")
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={stopped}", *SHORT, "resume=auto"])
    expected = {m["step"]: m["loss"] for m in read_metrics(straight) if m["step"] > 3}
    resumed = {m["step"]: m["loss"] for m in read_metrics(stopped)}
    assert resumed == expected
    final_straight = resume.load_adapter_weights(straight / "checkpoints/step-6")
    final_resumed = resume.load_adapter_weights(stopped / "checkpoints/step-6")
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)
