"""How an adapter analysis is shown: the terminal table, analysis.json and the PNG figures.

Works from the JSON-ready report that trainer.analysis.ranks.analyze builds, so it needs no tensors; matplotlib is
imported only when a figure is drawn.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def print_report(report: dict[str, Any]) -> None:
    """Per adapter: where its base weights came from, the per-module table and the suggested rank."""
    for index, adapter in enumerate(report["adapters"]):
        print(f"\nadapter {index + 1}: {adapter['path']} (r={adapter['r']}, lora_alpha={adapter['lora_alpha']}, "
              f"{len(adapter['modules'])} modules)")
        base = adapter["base"]
        print(f"base weights: {base['path']}" if base["found"] else f"note: {base['note']}")
        if base.get("gguf_source"):  # W is not full precision: a reader of the amplification column should know
            print(f"note: {base['note']}")
        for problem in ("missing_weights", "mismatched_weights"):
            if base.get(problem):
                print(f"note: {len(base[problem])} base weights {problem.split('_')[0]}, e.g. {base[problem][0]}")
        print(format_table(adapter, report["similarity"] if index == 0 else None))
        print(format_suggestion(adapter))
    if report["similarity"] == {}:
        print("note: the two adapters share no module with the same input size; no subspace similarity")


def format_table(adapter_report: dict[str, Any], similarity: dict[str, Any] | None = None) -> str:
    headers = ["module", "r", "eff-rank@90%", "eff-rank@99%", "||dW||/||W||", "amplification"]
    if similarity is not None:
        headers += ["phi(1,1)", "mean phi", "output phi(1,1)"]
    rows = []
    for name, entry in adapter_report["modules"].items():
        ranks, amplified = entry["effective_rank"], entry["amplification"]
        row = [_short(name), str(entry["r"]), str(ranks["0.9"]), str(ranks["0.99"]),
               _number(entry["relative_update"]),
               f"{amplified['factor']:.3g}x" if amplified and amplified["factor"] else "-"]
        if similarity is not None:
            shared = similarity.get(name)
            row += [_number(shared and shared["phi_11"]), _number(shared and shared["mean_phi"]),
                    _number(shared and shared["phi_11_output"])]
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
    staging = json_path.with_name(f".{json_path.name}.partial")
    staging.write_text(json.dumps(_rounded(report), indent=1) + "\n")
    staging.replace(json_path)  # a crash never leaves half a file behind
    figures = plot_figures(report, out)
    for stale in set(FIGURES) - {path.name for path in figures}:  # a pair's figures, from an earlier run here
        (out / stale).unlink(missing_ok=True)
    return [json_path, *figures]


# ---------------------------------------------------------------- figures

# Panels follow the order of a Llama block: attention, then MLP; other module kinds come after, by name.
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SIMILARITY_LAYERS = 4  # columns of the phi heat-map grid; deeper models show layers spread evenly
STYLES = ("-", "--")  # adapter 1, adapter 2
FIGURES = ("spectra.png", "energy.png", "similarity.png", "top_direction.png")  # the last two for a pair only


def plot_figures(report: dict[str, Any], out: Path) -> list[Path]:
    spectra, energy, similarity, top_direction = (out / name for name in FIGURES)
    paths = [_plot_spectra(report, spectra), _plot_energy(report, energy)]
    if report["similarity"]:
        paths += [_plot_similarity(report, similarity), _plot_top_direction(report, top_direction)]
    return paths


def _group(name: str) -> tuple[str, int | None]:
    """(module kind, layer): 'model.layers.3.self_attn.q_proj' -> ('self_attn.q_proj', 3)."""
    match = re.search(r"layers\.(\d+)\.(.+)$", name)
    return (match[2], int(match[1])) if match else (_short(name), None)


def _kinds(names: Iterable[str]) -> list[str]:
    def position(kind: str) -> tuple[int, str]:
        last = kind.rsplit(".", 1)[-1]
        return (KIND_ORDER.index(last) if last in KIND_ORDER else len(KIND_ORDER), kind)
    return sorted({_group(name)[0] for name in names}, key=position)


def _grid(rows: int, columns: int, panel_size: tuple[float, float]) -> tuple[Any, Any]:
    # A bare Figure (no pyplot) leaves the caller's matplotlib backend and global state alone.
    from matplotlib.figure import Figure
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.8), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def _line_panels(names: Iterable[str], curves: list[tuple[str, list[float], str]], xlabel: str, ylabel: str,
                 legend_at: str) -> tuple[Any, dict[str, Any]]:
    """A panel per module kind; each curve (module, values at 1..n, line style) coloured by its layer."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    kinds = _kinds(names)
    layers = sorted({layer for name in names if (layer := _group(name)[1]) is not None})
    scale = Normalize(min(layers, default=0), max(max(layers, default=1), min(layers, default=0) + 1))
    colours = matplotlib.colormaps["viridis"]
    columns = min(4, len(kinds))
    figure, grid = _grid(math.ceil(len(kinds) / columns), columns, (4.2, 3.3))
    axes = dict(zip(kinds, grid.ravel()))
    for unused in grid.ravel()[len(kinds):]:
        unused.set_visible(False)
    for name, values, style in curves:
        layer = _group(name)[1]
        axes[_group(name)[0]].plot(range(1, len(values) + 1), values, style, linewidth=1.2,
                                   marker="." if len(values) <= 32 else None,
                                   color=colours(scale(layer)) if layer is not None else "C0")
    longest = max((len(values) for _, values, _ in curves), default=1)
    for kind, axis in axes.items():
        axis.set_title(kind, fontsize=10)
        axis.set(xlabel=xlabel, ylabel=ylabel)
        axis.grid(alpha=0.3)
        if longest >= 32:  # a log axis keeps the top directions of a small r visible beside a large one
            ticks = [2 ** power for power in range(int(math.log2(longest)) + 1)]
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(tick) for tick in ticks])
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    # One key serves every panel: a layer has the same colour throughout.
    if len(layers) <= 8:
        keys = [Line2D([], [], color=colours(scale(layer)), marker=".", label=f"layer {layer}") for layer in layers]
        axes[kinds[0]].legend(handles=keys, fontsize=7, loc=legend_at)
    else:
        figure.colorbar(ScalarMappable(scale, colours), ax=list(axes.values()), label="layer", shrink=0.6)
    return figure, axes


def _save(figure: Any, title: str, path: Path) -> Path:
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=110)
    return path


def _adapter_legend(adapters: list[dict[str, Any]]) -> str:
    if len(adapters) == 1:
        return f"\n{_label(adapters[0]['path'])} (r={adapters[0]['r']})"
    return "".join(f"\n{style}: {_label(adapter['path'])} (r={adapter['r']})"
                   for adapter, style in zip(adapters, ("solid", "dashed")))


def _plot_spectra(report: dict[str, Any], path: Path) -> Path:
    adapters, curves, smallest = report["adapters"], [], 1.0
    for adapter, style in zip(adapters, STYLES):
        for name, entry in adapter["modules"].items():
            singular = entry["singular_values"]
            if singular and singular[0] > 0:  # a zero update has no spectrum to draw
                relative = [max(value / singular[0], 1e-6) for value in singular]
                smallest = min(smallest, *relative)
                curves.append((name, relative, style))
    names = [name for adapter in adapters for name in adapter["modules"]]
    figure, axes = _line_panels(names, curves, "singular value index i", "sigma_i / sigma_1", "lower left")
    for axis in axes.values():
        axis.set(yscale="log", ylim=(10 ** math.floor(math.log10(smallest)) * 0.8, 1.5))
    clipped = " (below 1e-6 drawn at 1e-6)" if smallest <= 1e-6 else ""
    return _save(figure, f"Singular values of dW = scaling * B @ A, relative to the largest{clipped}"
                 + _adapter_legend(adapters), path)


def _plot_energy(report: dict[str, Any], path: Path) -> Path:
    adapters = report["adapters"]
    curves = [(name, entry["cumulative_energy"], style) for adapter, style in zip(adapters, STYLES)
              for name, entry in adapter["modules"].items()
              if entry["cumulative_energy"] and entry["cumulative_energy"][-1] > 0]
    names = [name for adapter in adapters for name in adapter["modules"]]
    figure, axes = _line_panels(names, curves, "top-k directions kept", "share of ||dW||_F^2", "lower right")
    for axis in axes.values():
        axis.set_ylim(0, 1.03)
        for level in sorted({*report["energy_levels"], report["threshold"]}):
            axis.axhline(level, color="grey", linestyle=":", linewidth=1)
            axis.text(1.01, level, f"{level * 100:g}%", transform=axis.get_yaxis_transform(),
                      va="center", color="grey", fontsize=8)
        for adapter, style in zip(adapters, STYLES):
            if adapter["suggestion"]:
                rank = adapter["suggestion"]["r"]
                axis.axvline(rank, color="firebrick", linestyle=style, linewidth=1, alpha=0.7)
                axis.text(rank, 0.03, f"suggested r={rank} ", color="firebrick", fontsize=7, rotation=90,
                          va="bottom", ha="right")
    return _save(figure, "Share of the update's energy ||dW||_F^2 held by its top-k singular directions"
                 + _adapter_legend(adapters), path)


def _plot_similarity(report: dict[str, Any], path: Path) -> Path:
    """phi(i, j) heat maps as in the LoRA paper's Figure 3: a row per module kind, a column per layer."""
    from matplotlib.ticker import MaxNLocator
    similarity = report["similarity"]
    first, second = report["adapters"]
    kinds = _kinds(similarity)
    layers = sorted({_group(name)[1] for name in similarity}, key=lambda layer: -1 if layer is None else layer)
    if len(layers) > MAX_SIMILARITY_LAYERS:  # analysis.json holds every module
        layers = [layers[round(step * (len(layers) - 1) / (MAX_SIMILARITY_LAYERS - 1))]
                  for step in range(MAX_SIMILARITY_LAYERS)]
    panels = {_group(name): name for name in similarity}
    figure, grid = _grid(len(kinds), len(layers), (2.9, 1.9))
    image = None
    for row, kind in enumerate(kinds):
        for column, layer in enumerate(layers):
            axis = grid[row, column]
            name = panels.get((kind, layer))
            if name is None:
                axis.set_visible(False)
                continue
            phi = similarity[name]["phi"]
            image = axis.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                                extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5))
            axis.text(0.98, 0.05, f"phi(1,1)={phi[0][0]:.2f}", transform=axis.transAxes, ha="right",
                      va="bottom", fontsize=7, bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8})
            axis.tick_params(labelsize=7)
            axis.xaxis.set_major_locator(MaxNLocator(8, integer=True))
            axis.yaxis.set_major_locator(MaxNLocator(4, integer=True))
            if row == 0:
                axis.set_title(f"layer {layer}" if layer is not None else "", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{kind}\ni (adapter 1)", fontsize=8)
            if row == len(kinds) - 1:
                axis.set_xlabel("j (adapter 2)", fontsize=8)
    figure.colorbar(image, ax=grid, label="phi(i, j)", shrink=0.6)
    widths = sorted({first["modules"][name]["in_features"] for name in similarity})
    title = (f"Subspace similarity phi(i, j) = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j) of the top right-singular "
             f"directions of dW\n1 = same directions, 0 = orthogonal; independent random directions give about "
             f"max(i, j) / d (d = input width: {', '.join(map(str, widths))})\n"
             f"adapter 1 (rows i): {_label(first['path'])} (r={first['r']})\n"  # a line each: long paths fit
             f"adapter 2 (columns j): {_label(second['path'])} (r={second['r']})")
    return _save(figure, title, path)


def _plot_top_direction(report: dict[str, Any], path: Path) -> Path:
    """phi(1, j): how much of adapter 1's top direction lies within adapter 2's top-j directions."""
    similarity = report["similarity"]
    first, second = report["adapters"]
    curves = [(name, entry["phi"][0], "-") for name, entry in similarity.items()]
    figure, axes = _line_panels(similarity, curves, "j (top-j directions of adapter 2)", "phi(1, j)", "upper left")
    columns = range(1, max(len(values) for _, values, _ in curves) + 1)
    for kind, axis in axes.items():
        axis.set_ylim(0, 1.02)
        for width in {first["modules"][name]["in_features"] for name in similarity if _group(name)[0] == kind}:
            axis.plot(columns, [min(1.0, column / width) for column in columns], color="grey", linestyle="--",
                      linewidth=1)
    return _save(figure, "Share of adapter 1's top direction inside adapter 2's top-j directions, phi(1, j); "
                 "grey dashed: independent random directions (j / input width)\n"
                 f"adapter 1: {_label(first['path'])} (r={first['r']})\n"
                 f"adapter 2: {_label(second['path'])} (r={second['r']})", path)
