"""Rank-deficiency analysis of LoRA adapters (Hu et al. 2021, sections 7.2-7.3), for PEFT adapter dirs.

Per module: the spectrum of dW = scaling * B @ A, its effective rank, its size relative to the base
weight W, and how much it amplifies directions W already uses. With two adapters: the normalised
subspace similarity phi(i, j) of their top right-singular directions. `analyze` returns it all as a
JSON-ready dict; trainer/analysis/loading.py reads the adapters and the base weights from disk,
trainer/analysis/figures.py prints the result, writes analysis.json and draws the figures, and
launch/analyze.py is the command line. Needs torch only (no DeepSpeed, no GPU).
"""
from __future__ import annotations

import math
import statistics
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.analysis.loading import Adapter, BaseWeights, load_adapter, natural_key, open_base

ENERGY_LEVELS = (0.9, 0.99)
SUGGEST_MODULE_FRACTION = 0.8  # a rank is suggested once this share of modules keeps the energy
EXACT_SVD_MAX_DIM = 1024  # above this, W's top singular values come from a randomized SVD


@dataclass
class Decomposition:
    left: torch.Tensor  # [out, m] left singular vectors of dW
    singular: torch.Tensor  # [m], descending
    right: torch.Tensor  # [in, m] right singular vectors of dW


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


# ---------------------------------------------------------------- whole runs


def compare_adapters(first: Adapter, second: Adapter) -> dict[str, Any]:
    """phi(i, j) between the right singular directions of two adapters' dW (the input directions
    they read, as in the paper's Figure 3), for modules they share; and phi_output, the same for
    the left singular directions (the output directions they write).

    Both views matter after a short run: dW's input directions lie in A's row space, and A starts
    random (Kaiming) and moves slowly, while B starts at zero, so dW's output directions are
    learned from scratch."""
    result = {}
    for name in sorted(first.modules.keys() & second.modules.keys(), key=natural_key):
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
