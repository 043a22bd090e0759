"""Adapter-only checkpoints in PEFT's layout, plus the state needed to resume.

    checkpoints/step-<N>/
        adapter_config.json, adapter_model.safetensors   PEFT layout: loads with PeftModel.from_pretrained
        optimizer.safetensors                            Adam moments of the adapter, consolidated (any world size)
        trainer_state.json                               step, tokens seen, Adam step, data cursor
        rng_state.json                                   per-rank python / numpy / torch (CPU, CUDA) RNG
        recipe.yaml, meta.json                           what produced it (meta: step, eval_loss if evaluated there)
        COMPLETE                                         written last; a directory without it is ignored
    checkpoints/best -> step-<N>                         the saved checkpoint with the lowest held-out loss

Everything is gathered to full tensors on every rank (collectives), then rank 0 writes into a
temporary directory and renames it into place, so a crash mid-write never leaves a
half-checkpoint that `resume=auto` would pick. `best` is a relative symlink swapped atomically
(best.json names the checkpoint where symlinks are not allowed); `keep_last` pruning never removes
the checkpoint it points at, and `resume=auto` never follows it (it takes the newest). Both are
trainer/checkpoint/best.py's.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.runtime import distributed
from trainer.checkpoint.best import COMPLETE, mark_best_and_prune
from trainer.config import Recipe
from trainer.model.adapters import adapter_parameters

PEFT_PREFIX = "base_model.model."
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or does not match the recipe."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # trained (response) tokens, all ranks
    examples_seen: int = 0  # the data cursor: position in the endless stream of shuffled epochs
    epoch: int = 0  # examples_seen // training examples
    position_in_epoch: int = 0  # examples_seen % training examples
    global_batch_size: int = 0
    world_size: int = 1
    train_examples: int = 0  # size of the training set the cursor counts in (a resume checks it)
    best_eval_loss: float | None = None
    best_step: int | None = None
    held_out: str | None = None  # `held_out_identity` of the examples best_eval_loss was scored on
    loss_scale: dict | None = None  # fp16's dynamic loss scaler (`loss_scale_state`); None in fp32 and bf16
    overflow_skips: int = 0  # fp16 updates skipped for overflow so far (the log's running count)


# What a dynamic fp16 loss scaler has learned (its scale, and where it is in its window since the
# last overflow): without it a resumed run starts again at the initial scale, pays overflow skips
# anew, and computes other fp16 gradients than the uninterrupted run.
LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler(engine_optimizer) -> object | None:
    """DeepSpeed's dynamic fp16 loss scaler (ZeRO's `loss_scaler`, stage 0's `loss_scale_config`),
    or None (fp32, bf16, a static scale)."""
    for name in ("loss_scaler", "loss_scale_config"):
        scaler = getattr(engine_optimizer, name, None)
        if scaler is not None and (getattr(scaler, "dynamic", False) or getattr(scaler, "dynamic_loss_scale", False)):
            return scaler
    return None


def loss_scale_state(engine_optimizer) -> dict | None:
    scaler = loss_scaler(engine_optimizer)
    return None if scaler is None else {name: getattr(scaler, name) for name in LOSS_SCALE_FIELDS
                                        if hasattr(scaler, name)}


def rng_state() -> dict:
    """This rank's RNG states as plain JSON (no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


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
        "use_dora": lora.dora,
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

    if not optimizer.state:  # before the first step Adam has no state yet (and ZeRO has linked none)
        return {}, 0
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
         base_name_or_path: str, state: TrainState, meta: dict, eval_loss: float | None = None) -> Path | None:
    """Write checkpoints/step-<N>/ atomically and refresh checkpoints/best. Call on every rank;
    returns the path on rank 0. `eval_loss`: the held-out loss at this step, if evaluated."""
    weights = gather_adapter(model)
    moments, adam_step = gather_optimizer_state(model, optimizer)
    rng_states = distributed.gather_objects(rng_state())
    final = output_dir / "checkpoints" / f"step-{state.step}"
    error = None
    if distributed.is_main():
        needed = sum(t.numel() * t.element_size() for t in [*weights.values(), *moments.values()]) + 2**20
        try:
            _write(final, weights, moments, rng_states, recipe, base_name_or_path, state,
                   {**meta, "eval_loss": eval_loss if eval_loss is not None and math.isfinite(eval_loss) else None}, adam_step, needed)
        # SafetensorError: safetensors' own I/O error (a full disk, a quota), not an OSError.
        except (OSError, SafetensorError, CheckpointError) as failure:
            shutil.rmtree(final.with_name(f".tmp-{final.name}"), ignore_errors=True)
            reason = getattr(failure, "strerror", None) or failure  # SafetensorError has no strerror
            error = (str(failure) if isinstance(failure, CheckpointError) else
                     f"could not write checkpoint {final} ({reason}); it needs about "
                     f"{needed / 2**20:.1f} MiB. The previous checkpoint is intact: free space or point "
                     f"output_dir elsewhere, then resume=auto.")
    # Every rank learns the outcome, so a failed save stops all of them instead of hanging one.
    error = distributed.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return final if distributed.is_main() else None


def _write(final: Path, weights: dict, moments: dict, rng_states: list, recipe: Recipe, base_name_or_path: str,
           state: TrainState, meta: dict, adam_step: int, needed: int) -> None:
    _check_shapes(weights, recipe, "in memory")
    temporary = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    free = shutil.disk_usage(temporary).free
    if free < needed:
        raise CheckpointError(f"not enough space for checkpoint {final}: it needs about {needed / 2**20:.1f} MiB, "
                              f"{free / 2**20:.1f} MiB are free. The previous checkpoint is intact: free space "
                              f"or point output_dir elsewhere, then resume=auto.")
    (temporary / "adapter_config.json").write_text(json.dumps(adapter_config(recipe, base_name_or_path), indent=2))
    save_file(weights, str(temporary / "adapter_model.safetensors"), metadata={"format": "pt"})
    if moments:
        save_file(moments, str(temporary / "optimizer.safetensors"))
    trainer_state = {**asdict(state), "adam_step": adam_step}
    (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    (temporary / "rng_state.json").write_text(json.dumps(rng_states))
    (temporary / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    (temporary / "meta.json").write_text(json.dumps({"step": state.step, **meta}, indent=2))
    # Read back what was written: an empty or misshapen tensor must never become a checkpoint.
    _check_shapes(load_file(str(temporary / "adapter_model.safetensors")), recipe, "on disk")
    (temporary / COMPLETE).write_text("")
    follow_umask(temporary.iterdir())
    _fsync_tree(temporary)
    _replace_directory(temporary, final)
    try:
        mark_best_and_prune(final, recipe.train.keep_last)
    except OSError as error:  # the checkpoint itself is complete: keep training
        print(f"warning: checkpoint {final} is saved, but marking the best one or pruning old ones failed "
              f"({error})", flush=True)


def _replace_directory(new: Path, final: Path) -> None:
    """Rename `new` to `final`. An earlier `final` (a stale step-<N>) is renamed out of the way first
    and deleted last: deleting it in place, a crash could leave a half-deleted step-<N> that still
    holds its COMPLETE marker, which resume=auto would pick. Renamed, it no longer looks like a
    checkpoint (an interrupted replace leaves only the older ones)."""
    stale = final.with_name(f".stale-{final.name}")
    shutil.rmtree(stale, ignore_errors=True)  # left by a crash in an earlier replace
    if final.exists():
        os.replace(final, stale)
    os.replace(new, final)
    shutil.rmtree(stale, ignore_errors=True)


def _check_shapes(weights: dict[str, torch.Tensor], recipe: Recipe, where: str) -> None:
    # Under ZeRO-3 an ungathered parameter is an empty tensor: never write such a file.
    if not weights:
        raise CheckpointError(f"no adapter tensors {where}; refusing to write an empty adapter")
    for key, tensor in weights.items():
        if key.endswith(".lora_magnitude_vector"):  # DoRA: one magnitude per output row
            if tensor.dim() != 1 or tensor.numel() == 0:
                raise CheckpointError(f"adapter tensor {key} {where} has shape {tuple(tensor.shape)}, expected a "
                                      f"non-empty vector; refusing to write a broken adapter")
            continue
        rank_dim = 0 if ".lora_A." in key or key.endswith(".lora_embedding_A") else 1
        if tensor.dim() != 2 or tensor.numel() == 0 or tensor.shape[rank_dim] != recipe.lora.r:
            raise CheckpointError(f"adapter tensor {key} {where} has shape {tuple(tensor.shape)}, expected "
                                  f"rank {recipe.lora.r} along dim {rank_dim}; refusing to write a broken adapter")


def follow_umask(files: Iterable[Path]) -> None:
    """Give `files` (this process wrote them) the permissions the user's umask gives new files (0644
    under the usual 022): safetensors writes its files owner-only (0600), so on a shared cluster
    another account (a teammate, an evaluation or serving job) could not read an adapter or an export."""
    mode = 0o666 & ~_umask()
    for path in files:
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread, to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
