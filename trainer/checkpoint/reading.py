"""An adapter directory read back: its weights into a model, its config and meta.json, and the
check that it fits the recipe's base.

The check compares meta.json (written by the loop) with the recipe: the base by fingerprint
(trainer/checkpoint/fingerprint.py), and the quantisation. A mismatch is refused with both sides
named; a checkpoint written before fingerprints existed is checked by name only, with a warning.
Only global rank 0 reads files (`on_main`), so this works when other nodes cannot see its disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trainer.checkpoint.fingerprint import base_fingerprint, config_only_fingerprint
from trainer.checkpoint.best import BEST, complete_checkpoints
from trainer.checkpoint.saving import CheckpointError, peft_key
from trainer.config import Recipe
from trainer.model.base import resolve_base
from trainer.model.adapters import adapter_parameters
from trainer.runtime import distributed


class AdapterMismatchError(CheckpointError):
    """An adapter trained on another base, or with another quantisation, than the recipe's."""


def on_main(read):
    """Run `read()` on rank 0 only and hand its result (or its CheckpointError) to every rank."""
    outcome = None
    if distributed.is_main():
        try:
            outcome = ("ok", read())
        except CheckpointError as error:
            outcome = ("error", str(error))
    status, value = distributed.broadcast_object(outcome)
    if status == "error":
        raise CheckpointError(value)
    return value


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({error})") from None


def load_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return read_tensors(directory / "adapter_model.safetensors")


def load_into_model(model: nn.Module, directory: Path) -> None:
    """Copy adapter weights into the (not yet DeepSpeed-wrapped) model; every key must match."""
    weights = on_main(lambda: load_adapter_weights(directory))
    parameters = adapter_parameters(model)
    expected = {peft_key(name) for name in parameters}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{directory / 'adapter_model.safetensors'}: keys do not match the model "
                              f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    with torch.no_grad():
        for name, parameter in parameters.items():
            value = weights[peft_key(name)]
            if value.shape != parameter.shape:
                raise CheckpointError(f"{directory}: {peft_key(name)} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(parameter.shape)}")
            parameter.copy_(value.to(parameter.dtype))


def read_meta(adapter_dir: Path) -> dict | None:
    path = adapter_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def trained_dtype(checkpoint: Path) -> str | None:
    """The dtype the run loaded (and so quantised) its base in, as meta.json records it ("bfloat16");
    None for a checkpoint from before it was recorded."""
    return (read_meta(checkpoint) or {}).get("model_dtype")


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
            f"{adapter_dir} was trained with the base in {_bits(trained_bits)}, the recipe loads it in "
            f"{_bits(recipe.quant.bits)} (quant.bits={recipe.quant.bits}); set quant.bits={trained_bits}")
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
        if fingerprint != trained_fingerprint and trained_fingerprint == config_only_fingerprint(base, recipe.model.revision):
            # Recorded before pytorch_model.bin weights were read: the config matches, the weights were never checked.
            warnings.append(f"{adapter_dir} recorded a fingerprint of {trained_base}'s config.json alone (a .bin base, "
                            f"before weights were fingerprinted): the config matches {base}, its weights cannot be "
                            f"checked")
        elif fingerprint != trained_fingerprint:
            raise AdapterMismatchError(
                f"{adapter_dir} was trained on base {trained_base} (fingerprint {trained_fingerprint}), but the "
                f"recipe's base is {base} (fingerprint {fingerprint}); point model.name_or_path at the base it "
                f"was trained on")
        elif trained_base is not None and trained_base != base:
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
            f"outputs and scores differ from training's, the more so the larger that error (several percent of "
            f"the held-out loss on the built-in SmolLM2, a 4-bit GGUF requantised to NF4). Leave "
            f"quant.bits={trained_bits} to merge into the dequantised base, which reproduces what was trained")


def resolve_adapter(path: str | Path) -> Path:
    """An adapter= path as given, resolved (a `best` link that moves later must not change what is
    read), except `checkpoints/best` where symlinks were not allowed: the step-<N> that
    checkpoints/best.json names."""
    path = Path(path)
    note = path.parent / f"{BEST}.json"
    if path.name == BEST and not path.exists() and note.is_file():
        try:
            path = path.parent / json.loads(note.read_text())["best"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{note}: unreadable ({error}); give adapter=<run>/checkpoints/step-<N>") from None
    return path.resolve()


def _require_adapter_files(adapter_dir: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise CheckpointError(f"adapter={adapter_dir}: no {name} there ({adapter_instead(adapter_dir)})")


def adapter_instead(adapter_dir: Path, give: str = "adapter=") -> str:
    """What to give instead of an adapter= that holds no adapter: a run's output_dir, or the `best` of a
    run that never scored a held-out loss (data.eval_fraction=0 and no eval_path), is answered with the
    checkpoint to take (`give` before its path: analyze takes adapters without a key)."""
    checkpoints = (adapter_dir.parent if adapter_dir.name == BEST else adapter_dir if adapter_dir.name == "checkpoints"
                   else adapter_dir / "checkpoints")
    saved = complete_checkpoints(checkpoints)
    if adapter_dir.name != BEST and ((checkpoints / BEST).exists() or (checkpoints / f"{BEST}.json").is_file()):
        return f"a run's folder: give {give}{checkpoints / BEST}, its best checkpoint"
    if saved:
        return (f"no checkpoint of this run is marked {BEST} yet: none was saved at an evaluation step (with "
                f"data.eval_fraction=0 and no data.eval_path, none ever is); give {give}{saved[-1]}, its last")
    return f"expected a checkpoint directory such as runs/<name>/checkpoints/step-<N>, or checkpoints/{BEST}"


# The settings that decide which rows `build_datasets` holds out: the same ones, the same split.
SPLIT_SETTINGS = ("train.seed", "data.eval_fraction", "data.path", "data.mixture", "data.eval_path", "data.split",
                  "data.max_rows")


# The settings that, the split being the same, decide which held-out examples are scored and how they
# are tokenised and masked.
EXAMPLE_SETTINGS = ("data.max_eval_rows", "data.max_seq_len", "data.template", "data.train_on_prompt",
                    "data.on_too_long", "data.format", "data.columns")


def held_out_split_differences(recipe: Recipe, adapter_dir: Path) -> str | None:
    """Where this recipe would draw another held-out split than the run that trained `adapter_dir`
    (its recipe.yaml): a warning naming each setting, or None (the same split, or no recipe.yaml)."""
    changed = _changed_settings(recipe, adapter_dir, SPLIT_SETTINGS)
    if not changed:
        return None
    said, keep = changed
    return (f"{adapter_dir} was trained with another held-out split ({said}): the rows evaluated here are not "
            f"that run's held-out rows, and may be rows it trained on. Pass {keep} to evaluate on its "
            f"held-out rows, or eval.file=<json/jsonl> for other data")


def held_out_examples_note(recipe: Recipe, adapter_dir: Path, identity: str) -> str | None:
    """Where the held-out examples about to be scored (`identity`: `examples_identity`) are not the ones
    the run scored `adapter_dir`'s eval_loss on (its trainer_state.json `held_out`): a note naming the
    settings that differ, or None (the same examples, or nothing recorded)."""
    path = adapter_dir / "trainer_state.json"
    try:
        recorded = json.loads(path.read_text()).get("held_out") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, str) or recorded == identity:
        return None
    changed = _changed_settings(recipe, adapter_dir, EXAMPLE_SETTINGS)
    if changed:
        said, keep = changed
    else:
        said, keep = ("it has no recipe.yaml to compare the data settings with" if trained_recipe(adapter_dir) is None
                      else "no data setting differs from its recipe.yaml: the data itself, the tokenizer or the "
                           "base's chat template must (the built-in tasks changed in an update, say)"), None
    return (f"note: the held-out examples scored here are not those {adapter_dir.name}'s run scored its eval_loss on "
            f"({said}): the held-out loss below is not comparable with that run's metrics.jsonl"
            + (f"; pass {keep} to score the same examples" if keep else ""))


def _changed_settings(recipe: Recipe, adapter_dir: Path, settings: tuple[str, ...]) -> tuple[str, str] | None:
    """Which of `settings` this recipe sets otherwise than the run that trained `adapter_dir` (its
    recipe.yaml): ("key=old there, new here, ...", "key=old ...", to pass), or None."""
    trained = trained_recipe(adapter_dir)
    if trained is None:
        return None
    current = recipe.to_dict()
    changed = []
    for dotted in settings:
        section, key = dotted.split(".")
        before, now = (trained.get(section) or {}).get(key), current[section][key]
        if key in (trained.get(section) or {}) and before != now:
            changed.append((dotted, before, now))
    if not changed:
        return None
    said = ", ".join(f"{dotted}={before!r} there, {now!r} here" for dotted, before, now in changed)
    keep = " ".join(f"{dotted}={yaml.safe_dump(before, default_flow_style=True).strip().removesuffix('...').strip()}"
                    for dotted, before, _ in changed)
    return said, keep


def _trained_quant(adapter_dir: Path) -> dict:
    section = (trained_recipe(adapter_dir) or {}).get("quant")
    return section if isinstance(section, dict) else {}


def trained_recipe(checkpoint: Path) -> dict | None:
    """The recipe a checkpoint was trained with (its recipe.yaml); None where it has none (an
    export, an older checkpoint)."""
    path = checkpoint / "recipe.yaml"
    return read_yaml(path) if path.is_file() else None


def read_yaml(path: Path) -> dict:
    """A checkpoint's YAML file; one that cannot be read or parsed is a CheckpointError naming it."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None


def _bits(bits: int) -> str:
    return "16-bit (unquantised)" if bits == 16 else f"{bits}-bit"


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
