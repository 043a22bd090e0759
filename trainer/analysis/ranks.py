"""Rank-deficiency analysis of LoRA adapters (Hu et al. 2021, sections 7.2-7.3), for PEFT adapter dirs.

Per module: the spectrum of dW = scaling * B @ A, its effective rank, its size relative to the base
weight W, and how much it amplifies directions W already uses. With two adapters: the normalised
subspace similarity phi(i, j) of their top right-singular directions. `analyze` returns it all as a
JSON-ready dict; trainer/analysis/figures.py prints it, writes analysis.json and draws the figures, and
launch/analyze.py is the command line. Needs torch and safetensors only (no DeepSpeed, no GPU).
"""
from __future__ import annotations

import json
import math
import re
import statistics
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.checkpoint.saving import PEFT_PREFIX
from trainer.model.gguf import MARKER as GGUF_MARKER

ENERGY_LEVELS = (0.9, 0.99)
SUGGEST_MODULE_FRACTION = 0.8  # a rank is suggested once this share of modules keeps the energy
EXACT_SVD_MAX_DIM = 1024  # above this, W's top singular values come from a randomized SVD
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


@dataclass
class Decomposition:
    left: torch.Tensor  # [out, m] left singular vectors of dW
    singular: torch.Tensor  # [m], descending
    right: torch.Tensor  # [in, m] right singular vectors of dW


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
    for module, pair in sorted(halves.items(), key=lambda item: _natural_key(item[0])):
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


def _natural_key(name: str) -> list[Any]:
    # layers.10 after layers.9, not between layers.1 and layers.2
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def decompose(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Decomposition:
    """SVD of scaling * B @ A through QR of B and A^T, so only an r x r matrix is decomposed."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, singular, vh = torch.linalg.svd(scaling * r_b @ r_a.T, full_matrices=False)
    return Decomposition(left=q_b @ u, singular=singular, right=q_a @ vh.T)


def cumulative_energy(singular: torch.Tensor) -> torch.Tensor:
    """Share of ||dW||_F^2 held by the top-k directions, for k = 1..m (all zero for a zero update)."""
    energy = singular.double().square()
    total = energy.sum()
    return energy.cumsum(0) / total if total > 0 else torch.zeros_like(energy)


def effective_rank(singular: torch.Tensor, level: float) -> int:
    """Fewest directions holding `level` of the energy; 0 for a zero update (e.g. untrained B = 0)."""
    cumulative = cumulative_energy(singular)
    if not cumulative.numel() or cumulative[-1] == 0:
        return 0
    return int((cumulative < level - 1e-9).sum()) + 1


def subspace_similarity(right_1: torch.Tensor, right_2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j), as an [r1, r2] matrix (row i-1, column j-1)."""
    cumulative = (right_1.T @ right_2).square().cumsum(0).cumsum(1)
    i = torch.arange(1, cumulative.shape[0] + 1, dtype=cumulative.dtype)[:, None]
    j = torch.arange(1, cumulative.shape[1] + 1, dtype=cumulative.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def amplification(decomposition: Decomposition, weight: torch.Tensor, k: int, seed: int) -> dict[str, Any]:
    """Section 7.3: ||U_k^T W V_k||_F for dW's, random, and W's own top-k directions, and the factor
    ||dW||_F / ||U_k^T W V_k||_F by which dW amplifies the directions it shares with W."""
    weight = weight.float()
    left, right = decomposition.left[:, :k].float(), decomposition.right[:, :k].float()
    along_update = torch.linalg.norm(left.T @ weight @ right)
    generator = torch.Generator().manual_seed(seed)
    random_left = torch.linalg.qr(torch.randn(weight.shape[0], k, generator=generator))[0]
    random_right = torch.linalg.qr(torch.randn(weight.shape[1], k, generator=generator))[0]
    along_random = torch.linalg.norm(random_left.T @ weight @ random_right)
    if min(weight.shape) <= EXACT_SVD_MAX_DIM:
        weight_singular, method = torch.linalg.svdvals(weight), "exact"
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            weight_singular = torch.svd_lowrank(weight, q=min(k + 10, min(weight.shape)), niter=4)[1]
        method = "randomized"
    update_norm = float(decomposition.singular.square().sum().sqrt())
    return {
        "k": k, "dW_fro": update_norm,
        "projection_dW_directions": float(along_update),
        "projection_W_top_directions": float(weight_singular[:k].square().sum().sqrt()),
        "projection_random_directions": float(along_random),
        "factor": update_norm / float(along_update) if along_update > 0 else None,
        "W_top_svd": method,
    }


def analyze_adapter(adapter: Adapter, base: BaseWeights | None, threshold: float, seed: int) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for name, (a, b, scaling) in adapter.modules.items():
        decomposition = decompose(a, b, scaling)
        ranks = {str(level): effective_rank(decomposition.singular, level) for level in (*ENERGY_LEVELS, threshold)}
        update_norm = float(decomposition.singular.square().sum().sqrt())
        entry = {
            "r": a.shape[0], "in_features": a.shape[1], "out_features": b.shape[0], "scaling": scaling,
            "singular_values": decomposition.singular.tolist(),
            "cumulative_energy": cumulative_energy(decomposition.singular).tolist(),
            "effective_rank": ranks, "dW_fro": update_norm, "W_fro": None, "relative_update": None,
            "amplification": None,
        }
        weight = base.get(name, (b.shape[0], a.shape[1])) if base else None
        if weight is not None:
            weight = weight.float()
            entry["W_fro"] = float(torch.linalg.norm(weight))
            entry["relative_update"] = update_norm / entry["W_fro"] if entry["W_fro"] > 0 else None
            if update_norm > 0:
                k = max(1, ranks[str(threshold)])
                # crc32 rather than hash(): the random directions must not change between runs
                entry["amplification"] = amplification(decomposition, weight, k, seed + zlib.crc32(name.encode()))
            del weight  # keep memory near one base matrix at a time
        modules[name] = entry
    return {"modules": modules, "suggestion": suggest_rank(modules, threshold, adapter.config.get("r"))}


def suggest_rank(modules: dict[str, Any], threshold: float, trained_r: int | None) -> dict[str, Any] | None:
    """Smallest r whose top-r directions keep `threshold` of the energy in most modules."""
    curves = [entry["cumulative_energy"] for entry in modules.values()
              if entry["cumulative_energy"] and entry["cumulative_energy"][-1] > 0]
    if not curves:
        return None
    needed = math.ceil(SUGGEST_MODULE_FRACTION * len(curves) - 1e-9)
    for rank in range(1, max(len(curve) for curve in curves) + 1):
        kept = [curve[min(rank, len(curve)) - 1] for curve in curves]
        meeting = sum(share >= threshold - 1e-9 for share in kept)
        if meeting >= needed:
            break
    return {"r": rank, "threshold": threshold, "modules_meeting": meeting, "modules": len(curves),
            "median_energy": statistics.median(kept), "min_energy": min(kept),
            "required_module_fraction": SUGGEST_MODULE_FRACTION, "trained_r": trained_r,
            "zero_update_modules": len(modules) - len(curves)}


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


# ---------------------------------------------------------------- whole runs


def compare_adapters(first: Adapter, second: Adapter) -> dict[str, Any]:
    """phi(i, j) between the right singular directions of two adapters' dW (the input directions
    they read, as in the paper's Figure 3), for modules they share; and phi_output, the same for
    the left singular directions (the output directions they write).

    Both views matter after a short run: dW's input directions lie in A's row space, and A starts
    random (Kaiming) and moves slowly, while B starts at zero, so dW's output directions are
    learned from scratch."""
    result = {}
    for name in sorted(first.modules.keys() & second.modules.keys(), key=_natural_key):
        decomposition_1, decomposition_2 = decompose(*first.modules[name]), decompose(*second.modules[name])
        if decomposition_1.right.shape[0] != decomposition_2.right.shape[0]:
            continue  # different input spaces: no common subspace to compare
        phi = subspace_similarity(decomposition_1.right, decomposition_2.right)
        common = min(phi.shape)
        result[name] = {"phi": phi.tolist(), "phi_11": float(phi[0, 0]),
                        "mean_phi": float(phi[:common, :common].mean()), "phi_output": None, "phi_11_output": None}
        if decomposition_1.left.shape[0] == decomposition_2.left.shape[0]:
            phi_output = subspace_similarity(decomposition_1.left, decomposition_2.left)
            result[name].update(phi_output=phi_output.tolist(), phi_11_output=float(phi_output[0, 0]))
    return result


def analyze(paths: list[str | Path], threshold: float = 0.9, base: str | None = None,
            seed: int = 0) -> dict[str, Any]:
    """Every number of the analysis for one or two adapter dirs, as a JSON-ready dict."""
    adapters = [load_adapter(path) for path in paths]
    report: dict[str, Any] = {"threshold": threshold, "energy_levels": list(ENERGY_LEVELS), "seed": seed,
                              "adapters": [], "similarity": None}
    for adapter in adapters:
        weights, base_info = open_base(adapter.config, base)
        result = analyze_adapter(adapter, weights, threshold, seed)
        if weights is not None:
            if weights.missing:
                base_info["missing_weights"] = weights.missing
            if weights.mismatched:
                base_info["mismatched_weights"] = weights.mismatched
        config = adapter.config
        report["adapters"].append({
            "path": str(adapter.path), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")), "target_modules": config.get("target_modules"),
            "base_model_name_or_path": config.get("base_model_name_or_path"), "base": base_info, **result})
    if len(adapters) == 2:
        report["similarity"] = compare_adapters(*adapters)
    return report
