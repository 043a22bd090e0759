"""Adapter-only checkpoints in PEFT's layout, plus the state needed to resume.

    checkpoints/step-<N>/
        adapter_config.json, adapter_model.safetensors   PEFT layout: loads with PeftModel.from_pretrained
        optimizer.safetensors                            Adam moments of the adapter, consolidated (any world size)
        trainer_state.json                               step, tokens seen, optimizer step, data cursor
        recipe.yaml, meta.json                           what produced it
        COMPLETE                                         written last; a directory without it is ignored

Everything is gathered to full tensors on every rank (collectives), then rank 0 writes into a
temporary directory and renames it into place, so a crash mid-write never leaves a
half-checkpoint that `resume=auto` would pick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from trainer import distributed
from trainer.config import Recipe
from trainer.lora import adapter_parameters

PEFT_PREFIX = "base_model.model."
COMPLETE = "COMPLETE"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or does not match the recipe."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # trained (response) tokens, all ranks
    best_eval_loss: float | None = None
    best_step: int | None = None


# ------------------------------------------------------------------------------ naming


def peft_key(parameter_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` -> PEFT's saved key."""
    return PEFT_PREFIX + parameter_name


def adapter_config(recipe: Recipe, base_name_or_path: str) -> dict:
    lora = recipe.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "use_rslora": lora.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


# ------------------------------------------------------------------------------ gathering


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 adapter weights by PEFT key. A collective under ZeRO: call on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, parameter in adapter_parameters(model).items():
        value = safe_get_full_fp32_param(parameter)  # ZeRO 1-3 / bf16: the fp32 master copy
        if value is None:  # stage 0 in fp32: the parameter is the master copy
            value = parameter.detach()
        weights[peft_key(name)] = value.float().cpu().clone()
    return weights


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], int]:
    """Consolidated Adam moments of the adapter (not tied to the number of ranks), and the Adam step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    moments = {}
    for name, parameter in adapter_parameters(model).items():
        for key in ADAM_KEYS:
            value = safe_get_full_optimizer_state(parameter, key)
            if value is None:
                value = optimizer.state.get(parameter, {}).get(key)
            if value is not None:
                moments[f"{peft_key(name)}.{key}"] = value.float().cpu().clone()
    return moments, _adam_step(optimizer)


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


# ------------------------------------------------------------------------------ saving


def save(output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
         base_name_or_path: str, state: TrainState, meta: dict) -> Path | None:
    """Write checkpoints/step-<N>/ atomically. Call on every rank; returns the path on rank 0."""
    weights = gather_adapter(model)
    moments, adam_step = gather_optimizer_state(model, optimizer)
    final = output_dir / "checkpoints" / f"step-{state.step}"
    if distributed.is_main():
        _check_shapes(weights, recipe)
        temporary = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        (temporary / "adapter_config.json").write_text(
            json.dumps(adapter_config(recipe, base_name_or_path), indent=2))
        save_file(weights, str(temporary / "adapter_model.safetensors"), metadata={"format": "pt"})
        if moments:
            save_file(moments, str(temporary / "optimizer.safetensors"))
        trainer_state = {**asdict(state), "adam_step": adam_step}
        (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (temporary / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (temporary / "meta.json").write_text(json.dumps({"step": state.step, **meta}, indent=2))
        (temporary / COMPLETE).write_text("")
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _prune(output_dir / "checkpoints", recipe.train.keep_last, keep=final)
    distributed.barrier()
    return final if distributed.is_main() else None


def _check_shapes(weights: dict[str, torch.Tensor], recipe: Recipe) -> None:
    # Under ZeRO-3 an ungathered parameter is an empty tensor: never write such a file.
    for key, tensor in weights.items():
        rank_dim = 0 if ".lora_A." in key else 1
        if tensor.numel() == 0 or tensor.shape[rank_dim] != recipe.lora.r:
            raise CheckpointError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, expected rank "
                                  f"{recipe.lora.r} along dim {rank_dim}; refusing to write a broken adapter")


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _prune(checkpoints: Path, keep_last: int | None, keep: Path) -> None:
    if not keep_last:
        return
    for old in complete_checkpoints(checkpoints)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ resuming


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_dir(recipe: Recipe) -> Path | None:
    if recipe.resume in (None, "", "none"):
        return None
    if recipe.resume == "auto":
        found = complete_checkpoints(Path(recipe.output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(recipe.resume)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"resume={path}: not a complete checkpoint directory (no {COMPLETE} marker); "
                              f"use resume=auto to pick the newest complete one")
    return path


def load_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return _load_safetensors(directory / "adapter_model.safetensors")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({error})") from None


def load_into_model(model: nn.Module, directory: Path) -> None:
    """Copy adapter weights into the (not yet DeepSpeed-wrapped) model; every key must match."""
    weights = load_adapter_weights(directory)
    parameters = adapter_parameters(model)
    expected = {peft_key(name) for name in parameters}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: adapter keys do not match the model "
                              f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    with torch.no_grad():
        for name, parameter in parameters.items():
            value = weights[peft_key(name)]
            if value.shape != parameter.shape:
                raise CheckpointError(f"{directory}: {peft_key(name)} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(parameter.shape)}")
            parameter.copy_(value.to(parameter.dtype))


def restore_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           engine_optimizer) -> TrainState:
    """After deepspeed.initialize: restore the fp32 master weights and Adam state on every rank."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    try:
        raw = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory / 'trainer_state.json'}: unreadable ({error})") from None
    adam_step = raw.pop("adam_step", 0)
    state = TrainState(**raw)
    weights = load_adapter_weights(directory)
    moments_path = directory / "optimizer.safetensors"
    moments = _load_safetensors(moments_path) if moments_path.exists() else {}
    _materialise_adam_state(optimizer, adam_step)
    link_zero_optimizer_state(engine_optimizer)
    for name, parameter in adapter_parameters(model).items():
        key = peft_key(name)
        safe_set_full_fp32_param(parameter, weights[key].to(parameter.device))
        for moment in ADAM_KEYS:
            if f"{key}.{moment}" not in moments:
                continue
            value = moments[f"{key}.{moment}"].to(parameter.device)
            if hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping"):
                safe_set_full_optimizer_state(parameter, value, moment)
            else:
                optimizer.state[parameter][moment].copy_(value)
    return state


def _materialise_adam_state(optimizer: torch.optim.Optimizer, adam_step: int) -> None:
    """torch's Adam creates its state lazily at the first step; create it now (zeros) so saved
    moments can be copied in, with the step count that drives Adam's bias correction."""
    for group in optimizer.param_groups:
        for flat in group["params"]:
            state = optimizer.state[flat]
            state["step"] = torch.tensor(float(adam_step))
            for moment in ADAM_KEYS:
                state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))


def link_zero_optimizer_state(engine_optimizer) -> None:
    # ZeRO-1/2 link each parameter's fragment of the flat Adam state lazily, after the first step.
    link = getattr(engine_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
