"""The weights a rank analysis reads, from disk: a PEFT adapter directory's lora_A / lora_B pairs and
their scaling, and its base's W, one matrix at a time from memory-mapped safetensors files (found by
path, built-in name or in the Hugging Face cache; a base converted from a GGUF file is noted as such).
trainer/analysis/ranks.py analyses what these return. Needs torch and safetensors only.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.checkpoint.saving import PEFT_PREFIX
from trainer.model.gguf import MARKER as GGUF_MARKER

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
BASE_WEIGHT_NOTE = (
    "W is read unquantised from the base's safetensors files on disk. Training quantises this weight at "
    "load time, so W here is the exact full-precision reference that the quantised base approximates.")


class AnalysisError(ValueError):
    """An adapter or argument that cannot be analysed; the message says which path or key and why."""


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    # module path as in the base checkpoint (no "base_model.model." prefix) -> (A [r, in], B [out, r], scaling)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """An adapter directory's adapter_config.json and adapter_model.safetensors; AnalysisError naming
    what is missing (checked before anything is read or made)."""
    path = Path(path)
    expected = "a PEFT LoRA adapter directory holding adapter_config.json and adapter_model.safetensors"
    if not path.is_dir():
        raise AnalysisError(f"adapter directory not found: {path} (expected {expected})")
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AnalysisError(f"missing {config_path} (expected {expected})")
    if not weights_path.is_file():
        found_bin = " (found adapter_model.bin; only safetensors is supported)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AnalysisError(f"missing {weights_path}{found_bin} (expected {expected})")
    return config_path, weights_path


def load_adapter(path: str | Path) -> Adapter:
    config_path, weights_path = adapter_files(path)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisError(f"{config_path}: not valid JSON: {error}") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AnalysisError(f"{config_path}: peft_type is {config['peft_type']!r}; only LORA adapters are analysed")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _LORA_KEY.match(key)
        if match:  # other keys (biases, embeddings, DoRA magnitudes) carry no B @ A update
            halves.setdefault(match["module"], {})[match["side"]] = tensor
    if not halves:
        raise AnalysisError(f"{weights_path}: no lora_A/lora_B weights found (keys like "
                            f"'{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight' are expected)")
    modules = {}
    for module, pair in sorted(halves.items(), key=lambda item: natural_key(item[0])):
        for side, other in (("A", "B"), ("B", "A")):
            if side in pair and other not in pair:
                raise AnalysisError(f"{weights_path}: {module}.lora_{side}.weight has no matching "
                                    f"{module}.lora_{other}.weight")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AnalysisError(f"{weights_path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                f"do not form B @ A (expected A [r, in] and B [out, r])")
        name = module.removeprefix(PEFT_PREFIX)
        modules[name] = (a, b, _scaling(config, name, a.shape[0]))
    return Adapter(path=Path(path), config=config, modules=modules)


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    # PEFT lets rank_pattern / alpha_pattern override r and lora_alpha for modules whose name matches.
    def override(patterns: dict[str, Any] | None, default: float) -> float:
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default
    alpha = float(override(config.get("alpha_pattern"), config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def natural_key(name: str) -> list[Any]:
    # layers.10 after layers.9, not between layers.1 and layers.2
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- base weights


class BaseWeights:
    """Base weights read one matrix at a time from memory-mapped safetensors files, never the whole model."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self._handles: dict[Path, Any] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: directory / file for key, file in weight_map.items()}
        else:
            self._file_of = {key: file for file in sorted(directory.glob("*.safetensors"))
                             for key in self._open(file).keys()}
        if not self._file_of:
            raise AnalysisError(f"no *.safetensors weights in {directory}")

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get(self, module: str, shape: tuple[int, int]) -> torch.Tensor | None:
        # Checkpoints saved from a bare LlamaModel lack the leading "model." of LlamaForCausalLM's keys.
        for key in (f"{module}.weight", f"{module.removeprefix('model.')}.weight"):
            if key in self._file_of:
                weight = self._open(self._file_of[key]).get_tensor(key)
                if tuple(weight.shape) == tuple(shape):
                    return weight
                self.mismatched.append(f"{key} {tuple(weight.shape)} vs dW {tuple(shape)}")
                return None
        self.missing.append(f"{module}.weight")
        return None


def open_base(config: dict[str, Any], override: str | None) -> tuple[BaseWeights | None, dict[str, Any]]:
    """The base weights named by the adapter (or `override`), or None with a note saying why not."""
    requested = override or config.get("base_model_name_or_path")
    info: dict[str, Any] = {"requested": requested, "path": None, "found": False, "note": BASE_WEIGHT_NOTE,
                            "gguf_source": None}
    skipping = "skipping ||dW||/||W|| and amplification; pass base=<dir> to point at its safetensors"
    directory = _find_base(str(requested), config.get("revision")) if requested else None
    if directory is None:
        where = f"{requested!r} not found (no such directory, nor in the Hugging Face cache)" if requested else \
            "not named (adapter_config.json has no base_model_name_or_path)"
        info["note"] = f"base model {where}; {skipping}"
        return None, info
    try:
        weights = BaseWeights(directory)
    except (AnalysisError, OSError, KeyError, ValueError) as error:
        info["note"] = f"base model at {directory} unreadable ({error}); {skipping}"
        return None, info
    info.update(path=str(directory), found=True, gguf_source=_gguf_source(directory))
    if info["gguf_source"] is not None:
        info["note"] = gguf_weight_note(info["gguf_source"])
    return weights, info


def _gguf_source(directory: Path) -> str | None:
    """The GGUF file a base directory was converted from (trainer/model/gguf.py leaves its marker there,
    naming the file), or None for an ordinary checkpoint."""
    marker = directory / GGUF_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("source") or "name not recorded")
    except (OSError, ValueError, AttributeError):
        return "name not recorded"


def gguf_weight_note(source: str) -> str:
    # The conversion records the file's name, not its tensor types: a Q4_1 file's W carries 4-bit error.
    return (f"W is read from the base's safetensors files, dequantised to float32 from a GGUF file ({source}): "
            f"where that file is quantised (its name usually says how, e.g. Q4_1 or Q8_0), W is that quantised "
            f"weight, not the original full-precision one. Training quantises it again at load time.")


def _find_base(name: str, revision: str | None) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    # Any failure below means "not available offline"; the caller reports it and carries on without W.
    try:
        if name.startswith("builtin:"):
            from trainer import builtin
            resolved = Path(builtin.resolve(name))
            return resolved if resolved.is_dir() else None
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:
        return None
