"""Resuming from a checkpoint: find it, check it matches the recipe, restore every piece of state.

The saved state is consolidated (full adapter tensors and full Adam moments), so a checkpoint
written by N ranks resumes on M ranks with no conversion: each rank takes what its ZeRO
partition needs from the full tensors. Only global rank 0 reads the checkpoint and broadcasts
it, so resuming works when other nodes cannot see rank 0's disk.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from trainer.runtime import distributed
from trainer.checkpoint.best import COMPLETE, complete_checkpoints
from trainer.checkpoint.saving import ADAM_KEYS, CheckpointError, TrainState, loss_scaler, peft_key, set_rng_state
from trainer.checkpoint.reading import (check_adapter, load_adapter_weights, on_main, read_tensors, read_yaml,
                                       resolve_adapter)
from trainer.config import Recipe
from trainer.model.base import ModelLoadError
from trainer.model.adapters import adapter_parameters
from trainer.runtime.quiet import TrainerWarning

# Fields that change what the adapter means: resuming across them is refused. The base itself is
# checked by fingerprint (check_base), not by its path: a base moved to a new path resumes.
# data.train_on_prompt changes the objective (which tokens the loss is taken on), as data.template its text.
MUST_MATCH = ("quant.bits", "quant.quant_type", "quant.double_quant", "lora.r",
              "lora.alpha", "lora.rslora", "lora.dora", "lora.target_modules", "data.template", "data.train_on_prompt")
FOUR_BIT_ONLY = ("quant.quant_type", "quant.double_quant")  # unused at 8 and 16 bits: a change there means nothing
# Fields that change how training continues, or what it is evaluated on: allowed, with a warning.
WARN_IF_CHANGED = ("train.learning_rate", "train.max_steps", "train.warmup_steps", "train.min_lr_ratio",
                   "train.weight_decay", "data.path", "data.mixture", "data.eval_path", "data.split", "data.format",
                   "data.columns", "data.max_rows", "data.max_seq_len", "data.on_too_long", "data.max_eval_rows",
                   "lora.dropout", "lora.plus_ratio", "train.seed", "data.drop_leaked", "data.packing", "data.eval_fraction")


def find_resume_dir(recipe: Recipe) -> Path | None:
    return on_main(lambda: _find_resume_dir(recipe))


def _find_resume_dir(recipe: Recipe) -> Path | None:
    if recipe.resume in (None, "", "none"):
        return None
    if recipe.resume == "auto":
        checkpoints = Path(recipe.output_dir) / "checkpoints"
        found = complete_checkpoints(checkpoints)
        if not found:  # said, so a resume that found nothing is not mistaken for one that continued
            print(f"resume=auto: no complete checkpoint in {checkpoints}; starting fresh", flush=True)
        return found[-1] if found else None
    # checkpoints/best as adapter= reads it: through best.json where symlinks were not allowed, and
    # resolved, so that the checkpoint read is the one the run's note names.
    path = resolve_adapter(recipe.resume)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"resume={path}: not a complete checkpoint directory (no {COMPLETE} marker); "
                              f"use resume=auto to pick the newest complete one")
    return path


def check_compatible(directory: Path, recipe: Recipe) -> None:
    """Refuse a checkpoint whose adapter means something else, or whose data cursor would not carry
    over; warn on changed training settings."""
    saved = on_main(lambda: read_yaml(directory / "recipe.yaml"))  # a checkpoint resumed from has one
    current = recipe.to_dict()
    for dotted in MUST_MATCH:
        if dotted in FOUR_BIT_ONLY and recipe.quant.bits != 4:  # quant.bits itself matched, just before
            continue
        before, now = _lookup(saved, dotted), _lookup(current, dotted)
        if _normalise(before) != _normalise(now):
            raise CheckpointError(f"cannot resume from {directory}: {dotted} was {before!r} there, the recipe "
                                  f"says {now!r}. Resume with the original value, or start a new output_dir.")
    check_base(directory, recipe)
    before, now = _lookup(saved, "train.global_batch_size"), recipe.train.global_batch_size
    if before is not None and before != now:
        # The data cursor is step x global_batch_size (trainer/loop.py), and the plan's batches are cut
        # at that size: another size would skip or repeat examples from the resumed step on.
        raise CheckpointError(f"cannot resume from {directory}: it was trained with train.global_batch_size="
                              f"{before}, the recipe says {now}, and the position in the data cannot carry over "
                              f"to another batch size (examples would be skipped or repeated). Resume with "
                              f"train.global_batch_size={before}, or start a fresh run in a new output_dir.")
    for dotted in WARN_IF_CHANGED:
        before, now = _lookup(saved, dotted), _lookup(current, dotted)
        if before != now and distributed.is_main():
            warnings.warn(f"resuming from {directory} with {dotted} changed from {before!r} to {now!r}",
                          TrainerWarning, stacklevel=2)


def check_base(directory: Path, recipe: Recipe) -> None:
    """The recipe's base must be the one the checkpoint was trained on, by fingerprint, as eval, export
    and chat check it: a base changed in place is refused, the same base at a new path resumes."""
    try:
        notes = on_main(lambda: _check_adapter(recipe, directory))
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume: {error}; or start a fresh run in a new output_dir") from None
    if distributed.is_main():
        for note in notes:
            warnings.warn(f"resuming from {directory}: {note}", TrainerWarning, stacklevel=3)


def _check_adapter(recipe: Recipe, directory: Path) -> list[str]:
    try:
        return check_adapter(recipe, directory)
    except ModelLoadError as error:  # a base that cannot be fingerprinted: on_main passes on CheckpointErrors only
        raise CheckpointError(str(error)) from None


def _normalise(value):
    return sorted(value) if isinstance(value, list) else value


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated ({error})") from None


def restore_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           engine_optimizer) -> TrainState:
    """After deepspeed.initialize, on every rank: fp32 master weights, Adam moments and step, RNG."""
    raw, weights, moments, rng_states = on_main(lambda: _read_training_state(directory))
    adam_step = raw.pop("adam_step", 0)
    state = TrainState(**raw)
    apply_training_state(model, optimizer, engine_optimizer, weights, moments, adam_step)
    scaler = loss_scaler(engine_optimizer)
    if scaler is not None and state.loss_scale:
        for name, value in state.loss_scale.items():
            setattr(scaler, name, value)
    _restore_rng(directory, rng_states)
    return state


def apply_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, engine_optimizer,
                         weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], adam_step: int) -> None:
    """Set the fp32 master weights, Adam moments and Adam step from full (consolidated) tensors."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _materialise_adam_state(optimizer, engine_optimizer, adam_step)
    # ZeRO-1/2 link each parameter's slice of the flat Adam state lazily at the first step; link now.
    link = getattr(engine_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    for name, parameter in adapter_parameters(model).items():
        key = peft_key(name)
        value = weights[key].to(parameter.device)
        _set_model_copy(parameter, value)
        safe_set_full_fp32_param(parameter, value)  # the fp32 master, where ZeRO or bf16 keeps one
        for moment in ADAM_KEYS:
            saved = moments.get(f"{key}.{moment}")
            # No saved moment: the state was taken before this parameter's first step. Restore that
            # exactly (Adam starts it fresh), never keep what a later, perhaps non-finite, step wrote.
            if hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping"):
                # ZeRO's moments are slices of flat tensors shared by many parameters: zeros (with the
                # Adam step set above) are the fresh state.
                saved = saved if saved is not None else torch.zeros_like(value)
                safe_set_full_optimizer_state(parameter, saved.to(parameter.device), moment)
            elif saved is None:
                optimizer.state.pop(parameter, None)
            else:
                optimizer.state[parameter][moment].copy_(saved.to(parameter.device))


def _set_model_copy(parameter: nn.Parameter, value: torch.Tensor) -> None:
    """The copy forward passes use; under ZeRO-3 it is partitioned, so gather, set, re-partition."""
    import deepspeed

    with torch.no_grad():
        if hasattr(parameter, "ds_id"):
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                if distributed.is_main():
                    parameter.copy_(value.to(parameter.dtype))
        else:
            parameter.copy_(value.to(parameter.dtype))


def _read_training_state(directory: Path) -> tuple[dict, dict, dict, list]:
    moments_path, rng_path = directory / "optimizer.safetensors", directory / "rng_state.json"
    return (_read_json(directory / "trainer_state.json"), load_adapter_weights(directory),
            read_tensors(moments_path) if moments_path.exists() else {},
            _read_json(rng_path) if rng_path.exists() else [])


def _materialise_adam_state(optimizer: torch.optim.Optimizer, engine_optimizer, adam_step: int) -> None:
    """torch's Adam creates its state lazily at the first step; create it now (zeros) so saved
    moments can be copied in, with the step count that drives Adam's bias correction. The tensors
    Adam steps are the parameters (stage 0) or ZeRO's flat fp32 partitions: ZeRO-3 swaps its
    partitions into the optimizer's param_groups only while stepping, so ask it for them."""
    flat_tensors = [p for group in optimizer.param_groups for p in group["params"]]
    flat_tensors += list(getattr(engine_optimizer, "fp32_partitioned_groups_flat", []))
    for flat in flat_tensors:
        state = optimizer.state[flat]
        state["step"] = torch.tensor(float(adam_step))
        for moment in ADAM_KEYS:
            state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))


def _restore_rng(directory: Path, per_rank: list) -> None:
    if not per_rank:
        return
    path = directory / "rng_state.json"
    rank = distributed.rank()
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
    elif distributed.is_main() or rank == len(per_rank):
        # New ranks have no saved stream: they keep the seeded one (only dropout draws from it).
        warnings.warn(f"{path} holds RNG states for {len(per_rank)} ranks; rank {rank} and above keep "
                      f"their seeded RNG", TrainerWarning, stacklevel=2)
