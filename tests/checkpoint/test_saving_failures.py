"""What a checkpoint write that fails leaves behind: the previous checkpoint intact, one clear
message shared with every rank, and never a step-<N> that holds its COMPLETE marker but not its
files. No model: the gathered tensors are made directly, in the shapes the tiny recipe expects."""
from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch

from _checkpoints import tiny_recipe
from trainer.checkpoint import saving
from trainer.checkpoint.best import complete_checkpoints
from trainer.checkpoint.saving import CheckpointError, TrainState, peft_key
from trainer.runtime import distributed

PROJECTION = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def gathered(monkeypatch):
    """saving.save without a model: the adapter 'gathered' is a rank-r pair of zero matrices, no Adam state."""
    recipe = tiny_recipe()
    rank = recipe.lora.r
    weights = {peft_key(f"{PROJECTION}.lora_A.weight"): torch.zeros(rank, 64),
               peft_key(f"{PROJECTION}.lora_B.weight"): torch.zeros(64, rank)}
    monkeypatch.setattr(saving, "gather_adapter", lambda model: weights)
    monkeypatch.setattr(saving, "gather_optimizer_state", lambda model, optimizer: ({}, 0))


def save(output_dir: Path, step: int, meta: dict | None = None) -> Path | None:
    recipe = tiny_recipe(f"output_dir={output_dir}")
    return saving.save(output_dir, None, None, recipe, "tiny-llama", TrainState(step=step), meta or {})


def test_a_full_disk_in_safetensors_is_the_clear_message_every_rank_hears(tmp_path, gathered, monkeypatch):
    # safetensors reports its own I/O errors as SafetensorError, not OSError: a file size limit
    # (as a full disk or a quota would) makes save_file fail with "File too large (os error 27)".
    save(tmp_path, 2)
    shared = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: shared.append(value) or value)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the adapter file is 8 KiB
    try:
        with pytest.raises(CheckpointError) as failure:
            save(tmp_path, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "could not write checkpoint" in str(failure.value) and "step-4" in str(failure.value)
    assert "File too large" in str(failure.value) and "previous checkpoint is intact" in str(failure.value)
    assert shared == [str(failure.value)]  # broadcast, so the other ranks raise it too instead of hanging
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no .tmp-step-4 left


class Killed(BaseException):
    """The process dying: nothing in the save path catches it."""


def test_a_crash_while_replacing_a_stale_checkpoint_never_leaves_a_half_deleted_complete_one(tmp_path, gathered,
                                                                                              monkeypatch):
    save(tmp_path, 4, {"run": "stopped"})
    remove = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        # The old step-4's files go one by one; the process dies after the first.
        path = Path(path)
        if path.name.endswith("step-4") and not path.name.startswith(".tmp-") and path.is_dir():
            (path / "adapter_model.safetensors").unlink()
            raise Killed
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        save(tmp_path, 4, {"run": "resumed"})
    monkeypatch.setattr(shutil, "rmtree", remove)
    for checkpoint in complete_checkpoints(tmp_path / "checkpoints"):
        assert (checkpoint / "adapter_model.safetensors").is_file(), f"{checkpoint} is COMPLETE but half deleted"
    assert json.loads((tmp_path / "checkpoints" / "step-4" / "meta.json").read_text())["run"] == "resumed"
    save(tmp_path, 4, {"run": "again"})  # the next replace clears what the crash left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4"]


def test_saved_files_follow_the_umask_not_safetensors_owner_only_mode(tmp_path):
    """safetensors writes 0600: a teammate's account, or an evaluation job, could not read the adapter."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "kept.bin").write_text("")
    (tmp_path / "kept.bin").chmod(0o600)  # not written by this save: left as its owner set it
    mask = os.umask(0o027)
    try:
        saving.follow_umask([tmp_path / "adapter_model.safetensors", tmp_path / "meta.json"])
    finally:
        os.umask(mask)
    assert {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()} == {
        "adapter_model.safetensors": 0o640, "meta.json": 0o640, "kept.bin": 0o600}
