"""Rank-deficiency analysis of LoRA adapters (Hu et al. 2021, sections 7.2-7.3), for PEFT adapter dirs.

Per module: the spectrum of dW = scaling * B @ A, its effective rank, its size relative to the base
weight W, and how much it amplifies directions W already uses. With two adapters: the normalised
subspace similarity phi(i, j) of their top right-singular directions. Writes analysis.json and PNG figures.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ENERGY_LEVELS = (0.9, 0.99)
SUGGEST_MODULE_FRACTION = 0.8  # a rank is suggested once this share of modules keeps the energy
EXACT_SVD_MAX_DIM = 1024  # above this, W's top singular values come from a randomized SVD
PEFT_PREFIX = "base_model.model."
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


def load_adapter(path: str | Path) -> Adapter:
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
    return Adapter(path=path, config=config, modules=modules)


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
    info: dict[str, Any] = {"requested": requested, "path": None, "found": False, "note": BASE_WEIGHT_NOTE}
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
    info.update(path=str(directory), found=True)
    return weights, info


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
    """phi(i, j) between the right singular directions of two adapters' dW, for modules they share."""
    result = {}
    for name in sorted(first.modules.keys() & second.modules.keys(), key=_natural_key):
        right_1 = decompose(*first.modules[name]).right
        right_2 = decompose(*second.modules[name]).right
        if right_1.shape[0] != right_2.shape[0]:
            continue  # different input spaces: no common subspace to compare
        phi = subspace_similarity(right_1, right_2)
        common = min(phi.shape)
        result[name] = {"phi": phi.tolist(), "phi_11": float(phi[0, 0]),
                        "mean_phi": float(phi[:common, :common].mean())}
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


# ---------------------------------------------------------------- reporting


def format_table(adapter_report: dict[str, Any], similarity: dict[str, Any] | None = None) -> str:
    headers = ["module", "r", "eff-rank@90%", "eff-rank@99%", "||dW||/||W||", "amplification"]
    if similarity is not None:
        headers += ["phi(1,1)", "mean phi"]
    rows = []
    for name, entry in adapter_report["modules"].items():
        ranks, amplified = entry["effective_rank"], entry["amplification"]
        row = [_short(name), str(entry["r"]), str(ranks["0.9"]), str(ranks["0.99"]),
               _number(entry["relative_update"]),
               f"{amplified['factor']:.3g}x" if amplified and amplified["factor"] else "-"]
        if similarity is not None:
            shared = similarity.get(name)
            row += [_number(shared and shared["phi_11"]), _number(shared and shared["mean_phi"])]
        rows.append(row)
    widths = [max(len(line[column]) for line in [headers, *rows]) for column in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in [headers, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def format_suggestion(adapter_report: dict[str, Any]) -> str:
    suggestion = adapter_report["suggestion"]
    if suggestion is None:
        return "suggestion: none (every update is zero: was this adapter trained?)"
    return (f"suggestion: r={suggestion['r']} keeps >={suggestion['threshold'] * 100:g}% of the update energy "
            f"in {suggestion['modules_meeting']}/{suggestion['modules']} modules "
            f"(median {suggestion['median_energy']:.1%}, worst {suggestion['min_energy']:.1%}); "
            f"trained with r={suggestion['trained_r']}")


def _short(name: str) -> str:
    return name.removeprefix("model.")


def _label(path: str) -> str:
    return path if len(path) <= 60 else "..." + path[-57:]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _rounded(value: Any) -> Any:
    # Six significant digits keep the JSON readable (phi matrices are r1 x r2 per module) and lose nothing useful.
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(_rounded(report), indent=1) + "\n")
    return [json_path, *plot_figures(report, out)]


# ---------------------------------------------------------------- figures


def plot_figures(report: dict[str, Any], out: Path) -> list[Path]:
    paths = [_plot_curves(report, "spectra", out / "spectra.png"),
             _plot_curves(report, "energy", out / "energy.png")]
    if report["similarity"]:
        paths.append(_plot_similarity(report, out / "similarity.png"))
    return paths


def _group(name: str) -> tuple[str, int | None]:
    """(module kind, layer): 'model.layers.3.self_attn.q_proj' -> ('self_attn.q_proj', 3)."""
    match = re.search(r"layers\.(\d+)\.(.+)$", name)
    return (match[2], int(match[1])) if match else (_short(name), None)


def _grid(panels: int, columns: int, panel_size: tuple[float, float]) -> tuple[Any, list[Any]]:
    # A bare Figure (no pyplot) leaves the caller's matplotlib backend and global state alone.
    from matplotlib.figure import Figure
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes


def _plot_curves(report: dict[str, Any], kind: str, path: Path) -> Path:
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    adapters = report["adapters"]
    names = {name for adapter in adapters for name in adapter["modules"]}
    kinds = sorted({_group(name)[0] for name in names})
    layers = [layer for name in names if (layer := _group(name)[1]) is not None]
    colour_scale = Normalize(min(layers, default=0), max(max(layers, default=1), min(layers, default=0) + 1))
    colours = matplotlib.colormaps["viridis"]
    figure, axes = _grid(len(kinds), 3, (5.0, 3.6))
    for adapter_index, (adapter, style) in enumerate(zip(adapters, ("-", "--"))):
        for name, entry in adapter["modules"].items():
            singular = entry["singular_values"]
            if not singular or singular[0] <= 0:
                continue  # a zero update has no spectrum to draw
            group, layer = _group(name)
            ranks = range(1, len(singular) + 1)
            values = ([max(value / singular[0], 1e-6) for value in singular] if kind == "spectra"
                      else entry["cumulative_energy"])
            label = (f"layer {layer}" if layer is not None else group) if adapter_index == 0 else None
            axes[kinds.index(group)].plot(ranks, values, style, marker=".", label=label,
                                          color=colours(colour_scale(layer)) if layer is not None else "C0")
    for axis, group in zip(axes, kinds):
        axis.set_title(group)
        axis.grid(alpha=0.3)
        if kind == "spectra":
            axis.set(xlabel="singular value index i", ylabel="sigma_i / sigma_1 (log scale)", yscale="log",
                     ylim=(5e-7, 2))
        else:
            axis.set(xlabel="rank k", ylabel="share of ||dW||_F^2 in top k", ylim=(0, 1.03))
            for level in sorted({*ENERGY_LEVELS, report["threshold"]}):
                axis.axhline(level, color="grey", linestyle=":", linewidth=1)
                axis.text(1.01, level, f"{level * 100:g}%", transform=axis.get_yaxis_transform(),
                          va="center", color="grey", fontsize=8)
        if len(axis.get_lines()) <= 8 * len(adapters) + 3:
            axis.legend(fontsize=7)
        else:
            figure.colorbar(ScalarMappable(colour_scale, colours), ax=axis, label="layer")
    title = ("Normalised singular values of dW = scaling * B @ A (below 1e-6 drawn at 1e-6)" if kind == "spectra"
             else "Cumulative energy of dW vs rank")
    if len(adapters) == 2:
        title += f"\nsolid: {_label(adapters[0]['path'])}   dashed: {_label(adapters[1]['path'])}"
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return path


def _plot_similarity(report: dict[str, Any], path: Path) -> Path:
    similarity = report["similarity"]
    names = list(similarity)
    # Keep the figure readable on large models; analysis.json holds every module.
    shown = [names[round(step * (len(names) - 1) / 11)] for step in range(12)] if len(names) > 12 else names
    shown = list(dict.fromkeys(shown))
    figure, axes = _grid(len(shown), 4, (3.6, 3.4))
    image = None
    for axis, name in zip(axes, shown):
        phi = similarity[name]["phi"]
        image = axis.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                            extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5))
        axis.set(title=f"{_short(name)}\nphi(1,1)={similarity[name]['phi_11']:.2f}",
                 xlabel="j (top-j of adapter 2)", ylabel="i (top-i of adapter 1)")
        axis.title.set_fontsize(8)
    figure.colorbar(image, ax=axes[:len(shown)], label="phi(i, j)", shrink=0.8)
    first, second = (_label(adapter["path"]) for adapter in report["adapters"])
    subset = f" ({len(shown)} of {len(names)} modules; all are in analysis.json)" if len(shown) < len(names) else ""
    figure.suptitle(f"Subspace similarity phi(i,j) = ||V1_i^T V2_j||_F^2 / min(i,j){subset}\n"
                    f"adapter 1: {first}   adapter 2: {second}", fontsize=10)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- command line

OPTIONS = ("out", "threshold", "base", "seed")
USAGE = ("usage: python launch/analyze.py <adapter dir> [<second adapter dir>] "
         "[out=<dir>] [threshold=0.9] [base=<base model dir>] [seed=0] [--debug]")


def parse_args(argv: list[str]) -> dict[str, Any]:
    adapters, options = [], {}
    for arg in argv:
        key, has_value, value = arg.partition("=")
        if has_value and key in OPTIONS:
            options[key] = value
        elif has_value and not Path(arg).exists():
            raise AnalysisError(f"unknown option {key}= (valid: {', '.join(OPTIONS)})\n{USAGE}")
        else:
            adapters.append(arg)
    if not 1 <= len(adapters) <= 2:
        raise AnalysisError(f"expected one or two adapter directories, got {len(adapters)}\n{USAGE}")
    try:
        threshold, seed = float(options.get("threshold", 0.9)), int(options.get("seed", 0))
    except ValueError as error:
        raise AnalysisError(f"threshold must be a number and seed an integer: {error}") from None
    if not 0 < threshold <= 1:
        raise AnalysisError(f"threshold must be in (0, 1], got {threshold}")
    out = Path(options["out"]) if "out" in options else Path(adapters[0]) / "analysis"
    return {"paths": adapters, "out": out, "threshold": threshold, "base": options.get("base"), "seed": seed}


def main(argv: list[str] | None = None) -> int:
    """Command line: print the tables and suggestions, write analysis.json and figures; 2 on a known error."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    # Same switch as the other launch scripts: --debug or QLORA_DEBUG=1 shows the traceback instead.
    debug = "--debug" in argv or os.environ.get("QLORA_DEBUG") == "1"
    try:
        args = parse_args([arg for arg in argv if arg != "--debug"])
        report = analyze(args["paths"], args["threshold"], args["base"], args["seed"])
    except AnalysisError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    for index, adapter in enumerate(report["adapters"]):
        print(f"\nadapter {index + 1}: {adapter['path']} (r={adapter['r']}, lora_alpha={adapter['lora_alpha']}, "
              f"{len(adapter['modules'])} modules)")
        base = adapter["base"]
        print(f"base weights: {base['path']}" if base["found"] else f"note: {base['note']}")
        for problem in ("missing_weights", "mismatched_weights"):
            if base.get(problem):
                print(f"note: {len(base[problem])} base weights {problem.split('_')[0]}, e.g. {base[problem][0]}")
        print(format_table(adapter, report["similarity"] if index == 0 else None))
        print(format_suggestion(adapter))
    if report["similarity"] == {}:
        print("note: the two adapters share no module with the same input size; no subspace similarity")
    written = write_outputs(report, args["out"])
    print(f"\nwrote {', '.join(path.name for path in written)} to {args['out']}")
    return 0
