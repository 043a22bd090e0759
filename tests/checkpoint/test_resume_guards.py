"""What a resume (or an undone step) must refuse or restore exactly: the base by fingerprint, not
by path; the global batch the data cursor counts in; and, for train.on_nonfinite=skip, the Adam
state as it was before the step, even when that is no state at all (a non-finite first step)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _checkpoints import make_checkpoint, one_thread, tiny_recipe
from conftest import run_cli
from trainer.checkpoint import resume
from trainer.checkpoint.saving import CheckpointError
from trainer.checkpoint.snapshot import UpdateSnapshot
from trainer.model.adapters import adapter_parameters
from trainer.model.lora import apply_lora


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


# ------------------------------------------------------------------------------ undoing a first step


class OneProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 8)


def adapted_model() -> nn.Module:
    torch.manual_seed(0)
    model = OneProjection()
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    return model


def adam_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, poison: bool = False) -> None:
    optimizer.zero_grad()
    loss = model.q_proj(x).pow(2).sum()
    (loss * float("nan") if poison else loss).backward()
    optimizer.step()


def test_undoing_a_non_finite_first_step_restores_no_adam_state_and_the_next_step_is_a_first_one():
    """Before any step Adam has no state; the bad step writes NaN moments. Undoing it must remove
    them, so the next (finite) step equals a first step of a fresh optimizer."""
    x = torch.randn(3, 16)
    model = adapted_model()
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    snapshot = UpdateSnapshot(model, optimizer, optimizer)  # no DeepSpeed: the ZeRO-0 layout
    adam_step(model, optimizer, x, poison=True)
    assert any(not torch.isfinite(p).all() for p in adapter_parameters(model).values())

    snapshot.restore()
    assert all(torch.equal(p, before[name]) for name, p in adapter_parameters(model).items())
    assert not any(optimizer.state.get(p) for p in adapter_parameters(model).values())

    adam_step(model, optimizer, x)
    fresh = adapted_model()
    fresh_optimizer = torch.optim.AdamW(adapter_parameters(fresh).values(), lr=1e-2)
    adam_step(fresh, fresh_optimizer, x)
    expected = adapter_parameters(fresh)
    for name, parameter in adapter_parameters(model).items():
        assert torch.equal(parameter, expected[name]), name


SHORT = ["data.max_rows=40", "train.global_batch_size=16", "train.micro_batch_size=4", "train.warmup_steps=2",
         "train.log_every=1", "data.max_eval_rows=8", "train.eval_every=100", "train.sample_count=0"]


@pytest.mark.slow
def test_skip_mode_undoes_a_non_finite_first_step_and_trains_on(tmp_path, tiny_base):
    # tests/faults.py: launch/train.py with step 1's loss made NaN. One process: ZeRO runs as stage 0.
    result = run_cli(["tests/faults.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", *SHORT,
                      "train.max_steps=3", "train.save_every=1", "train.on_nonfinite=skip"],
                     env={"QLORA_TEST_NAN_AT_STEP": "1", "OMP_NUM_THREADS": "1"})
    assert "step 1: non-finite loss/gradient, update skipped (1 in a row)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [1]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] > 1)  # finite: NaN != NaN
    first = tmp_path / "checkpoints" / "step-1"
    assert not (first / "optimizer.safetensors").exists()  # as before any step: no Adam state
    assert all(not t.any() for k, t in load_file(str(first / "adapter_model.safetensors")).items() if "lora_B" in k)
    final = load_file(str(tmp_path / "checkpoints" / "step-3" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(t.any() for k, t in final.items() if "lora_B" in k)  # steps 2 and 3 did train


# ------------------------------------------------------------------------------ the base, by fingerprint


@pytest.fixture
def base_copy(tmp_path, tiny_base) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(tiny_base, copy)
    return copy


def test_a_base_changed_in_place_is_refused_by_its_fingerprint(tmp_path, base_copy):
    checkpoint = make_checkpoint(tmp_path / "run", f"model.name_or_path={base_copy}")
    weights = load_file(str(base_copy / "model.safetensors"))
    weights["model.norm.weight"] += 1  # another model at the same path
    save_file(weights, str(base_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"cannot resume: .*fingerprint .*point model.name_or_path"):
        resume.check_compatible(checkpoint, tiny_recipe(f"model.name_or_path={base_copy}"))


def test_the_same_base_at_a_new_path_resumes_with_a_note(tmp_path, base_copy):
    checkpoint = make_checkpoint(tmp_path / "run", f"model.name_or_path={base_copy}")
    moved = tmp_path / "moved"
    shutil.move(base_copy, moved)
    with pytest.warns(UserWarning, match="same fingerprint"):
        resume.check_compatible(checkpoint, tiny_recipe(f"model.name_or_path={moved}"))


# ------------------------------------------------------------------------------ the global batch


def test_a_changed_global_batch_size_is_refused_naming_both_values(tmp_path, tiny_base):
    checkpoint = make_checkpoint(tmp_path / "run", "train.global_batch_size=16")
    resume.check_compatible(checkpoint, tiny_recipe("train.global_batch_size=16"))  # the same: fine
    with pytest.raises(CheckpointError, match=r"train.global_batch_size=16, the recipe says 8.*"
                                              r"Resume with train.global_batch_size=16, or start a fresh run"):
        resume.check_compatible(checkpoint, tiny_recipe("train.global_batch_size=8"))


def test_the_train_command_refuses_a_changed_global_batch_size_with_one_message(tmp_path, tiny_base):
    make_checkpoint(tmp_path, "train.global_batch_size=16")
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", *SHORT,
                      "train.global_batch_size=8", "train.max_steps=3", "resume=auto"],
                     env={"OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "train.global_batch_size=16, the recipe says 8" in result.stderr


# ------------------------------------------------------------------------------ a dry run refuses it too


def dry_run_in_process(monkeypatch, recipe):
    """trainer.setup.setup(recipe, dry_run=True) in this process, as one rank with no process group
    (conftest: pytest's process must not start one); the dry run needs none."""
    from trainer.runtime import distributed
    from trainer.setup import setup

    monkeypatch.setattr(distributed, "init", lambda *_: torch.device("cpu"))
    return setup(recipe, dry_run=True)


def test_a_dry_run_refuses_an_incompatible_checkpoint_as_the_run_would(tmp_path, tiny_base, monkeypatch):
    make_checkpoint(tmp_path, *SHORT)  # lora.r=16
    run, _ = dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "resume=auto"))
    assert run is None  # the same checkpoint and recipe: valid
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step-1: lora.r was 16 there, the recipe says 8"):
        dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "resume=auto", "lora.r=8"))


def test_resuming_in_another_dtype_than_the_checkpoint_was_trained_in_warns(tmp_path, tiny_base, monkeypatch,
                                                                             capsys):
    """model.dtype=auto picks fp32 on a CPU and bf16 on a GPU: a run moved between them requantises
    its base from other weights, and says so, naming the setting that keeps the checkpoint's dtype."""
    checkpoint = make_checkpoint(tmp_path, *SHORT)
    dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "resume=auto"))
    assert "warning" not in capsys.readouterr().out  # no model_dtype recorded (an older checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "model_dtype": "float32"}))
    dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "resume=auto"))
    assert "warning" not in capsys.readouterr().out  # trained in the dtype this run loads
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "model_dtype": "bfloat16"}))
    dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "resume=auto"))
    out = capsys.readouterr().out
    assert "was trained with the base in bfloat16, this run loads it in float32" in out
    assert "model.dtype=bfloat16 keeps it" in out


def test_a_dry_run_refuses_a_deepspeed_config_the_run_would_refuse(tmp_path, tiny_base, monkeypatch):
    from trainer.config import RecipeError

    with pytest.raises(RecipeError, match="deepspeed.zero_stage=0 with a bfloat16 compute dtype cannot resume"):
        dry_run_in_process(monkeypatch, tiny_recipe(f"output_dir={tmp_path}", *SHORT, "model.dtype=bfloat16",
                                                    "deepspeed.zero_stage=0"))
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------ which checkpoint


def test_resume_from_checkpoints_best_reads_best_json_where_there_is_no_link(tmp_path):
    # Where symlinks are not allowed, checkpoints/best.json names the best checkpoint instead of a link:
    # resume=<run>/checkpoints/best follows it, as adapter=<run>/checkpoints/best does.
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        (checkpoints / f"step-{step}").mkdir(parents=True)
        (checkpoints / f"step-{step}" / "COMPLETE").write_text("")
    (checkpoints / "best.json").write_text(json.dumps({"best": "step-2", "eval_loss": 1.0}))
    found = resume.find_resume_dir(tiny_recipe(f"output_dir={tmp_path}", f"resume={checkpoints / 'best'}"))
    assert found == (checkpoints / "step-2").resolve()
    (checkpoints / "best.json").unlink()
    (checkpoints / "best").symlink_to("step-4", target_is_directory=True)  # a link: the checkpoint it names
    found = resume.find_resume_dir(tiny_recipe(f"output_dir={tmp_path}", f"resume={checkpoints / 'best'}"))
    assert found == (checkpoints / "step-4").resolve()


def test_resume_auto_with_no_complete_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)  # a save cut short: no COMPLETE marker
    assert resume.find_resume_dir(tiny_recipe(f"output_dir={tmp_path}", "resume=auto")) is None
    assert (f"resume=auto: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh"
            in capsys.readouterr().out)
    assert resume.find_resume_dir(tiny_recipe(f"output_dir={tmp_path}")) is None  # no resume asked: nothing said
    assert "resume=auto" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ 4-bit settings at 8 bits


def test_four_bit_settings_are_compared_on_resume_only_at_four_bits(tmp_path, tiny_base):
    """quant.quant_type and quant.double_quant do nothing at 8 bits: a change there is no reason to refuse."""
    eight = make_checkpoint(tmp_path / "eight", "quant.bits=8", "quant.double_quant=true", "quant.quant_type=nf4")
    resume.check_compatible(eight, tiny_recipe("quant.bits=8", "quant.double_quant=false", "quant.quant_type=fp4"))
    four = make_checkpoint(tmp_path / "four", "quant.bits=4", "quant.double_quant=true")
    with pytest.raises(CheckpointError, match="quant.double_quant was True there, the recipe says False"):
        resume.check_compatible(four, tiny_recipe("quant.bits=4", "quant.double_quant=false"))


@pytest.mark.slow
def test_the_train_command_under_resume_auto_with_nothing_to_resume_says_so_once(tmp_path, tiny_base):
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)  # a save cut short: no COMPLETE marker
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", *SHORT,
                      "train.max_steps=1", "train.report=false", "resume=auto"], env={"OMP_NUM_THREADS": "1"})
    assert f"resume=auto: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh" in result.stdout
    assert "held an earlier run's files" in result.stdout and "(resume=auto continues a run instead)" not in result.stdout
