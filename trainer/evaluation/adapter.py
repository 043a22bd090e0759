"""A trained adapter back on its base: check that the base is the one it was trained on, then
load base + our LoRA + the adapter weights. Used by evaluation and export.

The check reads the checkpoint's meta.json (written by the loop) and compares it with the recipe:
the base by fingerprint (config + tensor names, shapes, dtypes and a few sampled bytes, see
`base_fingerprint`), and the quantisation. A mismatch is refused with both sides named; a
checkpoint written before fingerprints existed is checked by name only, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
import yaml
from torch import nn

from trainer import builtin
from trainer import speedups
from trainer.runtime import distributed
from trainer.checkpoint.saving import CheckpointError
from trainer.config import Recipe
from trainer.model.lora import adapter_parameters, apply_lora
from trainer.checkpoint.resume import load_into_model
from trainer.model.base import ModelLoadError, load_base, load_tokenizer, resolve_base

# Fields a re-save changes without changing the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_SAMPLE_BYTES = 64  # read from the start and the middle of every tensor


class AdapterMismatchError(CheckpointError):
    """An adapter trained on another base, or with another quantisation, than the recipe's."""


# ------------------------------------------------------------------------------ fingerprint


def base_fingerprint(base_dir_or_id: str, revision: str | None = None) -> str:
    """A short hash that changes when the base does: config.json (minus version fields), every
    tensor's name, dtype and shape from the safetensors headers, and 2 x 64 bytes sampled from
    each tensor (so two fine-tunes of one architecture differ). Reads a few KiB per file, never
    the weights; independent of how the weights are split into shards."""
    directory = _local_directory(base_dir_or_id, revision)
    config = json.loads((directory / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            data_start = 8 + header_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                sample = b""
                for offset in (begin, begin + (end - begin) // 2):
                    handle.seek(data_start + offset)
                    sample += handle.read(min(_SAMPLE_BYTES, end - offset))
                tensors[name] = [info["dtype"], info["shape"], hashlib.sha256(sample).hexdigest()]
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _local_directory(base_dir_or_id: str, revision: str | None) -> Path:
    local = Path(builtin.resolve(base_dir_or_id))
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:  # a hub id: the copy in the local cache, never a download
        found = snapshot_download(str(local), revision=revision, local_files_only=True,
                                  allow_patterns=["config.json", "*.safetensors"])
    except Exception as error:  # huggingface_hub raises several types for "not in the cache"
        raise ModelLoadError(f"cannot fingerprint the base {base_dir_or_id!r}: not a local directory and not "
                             f"in the local hub cache ({type(error).__name__})") from None
    return Path(found)


# ------------------------------------------------------------------------------ the check


def read_meta(adapter_dir: Path) -> dict | None:
    path = adapter_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def check_adapter(recipe: Recipe, adapter_dir: Path) -> list[str]:
    """Refuse an adapter whose base or quantisation differs from the recipe's; returns warnings."""
    _require_adapter_files(adapter_dir)
    base = resolve_base(recipe)
    meta = read_meta(adapter_dir)
    if meta is None:
        return [f"{adapter_dir} has no meta.json: cannot check that it was trained on {base}"]
    warnings: list[str] = []
    trained_bits = meta.get("quant_bits")
    if trained_bits in (4, 8) and recipe.quant.bits == 16:
        warnings.append(original_weights_warning(trained_bits))
    elif trained_bits is not None and trained_bits != recipe.quant.bits:
        raise AdapterMismatchError(
            f"{adapter_dir} was trained on a {_bits(trained_bits)} base, the recipe loads a "
            f"{_bits(recipe.quant.bits)} one (quant.bits={recipe.quant.bits}); set quant.bits={trained_bits}")
    trained_quant = _trained_quant(adapter_dir)
    if recipe.quant.bits == 4 and trained_quant:
        for key in ("quant_type", "double_quant"):
            if key in trained_quant and trained_quant[key] != getattr(recipe.quant, key):
                raise AdapterMismatchError(
                    f"{adapter_dir} was trained with quant.{key}={trained_quant[key]}, the recipe has "
                    f"quant.{key}={getattr(recipe.quant, key)}")
    trained_base = meta.get("base_model")
    trained_fingerprint = meta.get("base_fingerprint")
    if trained_fingerprint is not None:
        fingerprint = base_fingerprint(base, recipe.model.revision)
        if fingerprint != trained_fingerprint:
            raise AdapterMismatchError(
                f"{adapter_dir} was trained on base {trained_base} (fingerprint {trained_fingerprint}), but the "
                f"recipe's base is {base} (fingerprint {fingerprint}); point model.name_or_path at the base it "
                f"was trained on")
        if trained_base is not None and trained_base != base:
            warnings.append(f"the adapter names its base {trained_base}; using {base}, which has the same fingerprint")
    elif trained_base is not None and trained_base != base:
        raise AdapterMismatchError(
            f"{adapter_dir} was trained on base {trained_base}, but the recipe's base is {base} (the checkpoint has "
            f"no base_fingerprint to tell whether they are copies of one model); point model.name_or_path at "
            f"{trained_base}")
    else:
        warnings.append(f"{adapter_dir}/meta.json has no base_fingerprint (an older checkpoint): only the base's "
                        f"name was checked, not its weights")
    trained_template = meta.get("template")
    if trained_template is not None and trained_template != recipe.data.template:
        warnings.append(f"the adapter was trained with data.template={trained_template}, the recipe uses "
                        f"{recipe.data.template}: prompts will not look like the training ones")
    return warnings


def original_weights_warning(trained_bits: int) -> str:
    """quant.bits=16 on an adapter trained on a quantised base: allowed (how most QLoRA adapters are
    deployed, peft's merge_and_unload on a 16-bit base), but not what training measured."""
    return (f"the adapter was trained on the {trained_bits}-bit quantised base; quant.bits=16 applies it to the "
            f"original 16-bit weights instead, without the quantisation error it was trained against, so "
            f"outputs and scores differ slightly from training's. Leave quant.bits={trained_bits} to merge into "
            f"the dequantised base, which reproduces what was trained")


def _require_adapter_files(adapter_dir: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise CheckpointError(f"adapter={adapter_dir}: no {name} there (expected a checkpoint directory "
                                  f"such as runs/<name>/checkpoints/step-<N>)")


def _trained_quant(adapter_dir: Path) -> dict:
    path = adapter_dir / "recipe.yaml"
    if not path.is_file():
        return {}
    section = (yaml.safe_load(path.read_text()) or {}).get("quant")
    return section if isinstance(section, dict) else {}


def _bits(bits: int) -> str:
    return "16-bit (unquantised)" if bits == 16 else f"{bits}-bit"


# ------------------------------------------------------------------------------ loading


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None
    if not isinstance(config.get("target_modules"), list):
        raise CheckpointError(f"{path}: target_modules must be a list of module names, got "
                              f"{config.get('target_modules')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{path}: per-module {key} is not supported by our LoRA")
    return config


def add_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Wrap the layers the adapter names with our LoRA (no dropout) and load its weights."""
    config = read_adapter_config(adapter_dir)
    apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"], 0.0,
               bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)))
    load_into_model(model, adapter_dir)


def load_adapted_model(recipe: Recipe, adapter_dir: Path | None,
                       device: torch.device) -> tuple[nn.Module, object, torch.dtype]:
    """Base (quantised as the recipe says) + adapter, in eval mode. `adapter_dir=None`: the base
    alone. Returns the model, the tokenizer and the compute dtype. Call `check_adapter` first."""
    with distributed.main_first():  # rank 0 builds a built-in base once
        tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    model, dtype = load_base(recipe, device)
    if adapter_dir is not None:
        add_adapter(model, adapter_dir)
        # Training ran the adapters in the compute dtype (DeepSpeed casts every parameter to bf16/fp16
        # and keeps the fp32 masters in the optimizer): evaluate them as they ran, so the held-out
        # loss is the one training logged. (Export merges the fp32 weights instead.)
        for parameter in adapter_parameters(model).values():
            parameter.data = parameter.data.to(dtype)
    speedups.apply(model, recipe, device, training=False)
    return model.eval(), tokenizer, dtype
