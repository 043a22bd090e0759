"""LoRA rank analysis (trainer/analysis/loading.py, ranks.py and figures.py, launch/analyze.py) on synthetic adapters
written to tmp_path."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from trainer.analysis.loading import AnalysisError, load_adapter
from trainer.analysis.ranks import analyze

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Planted singular values: 82% of the energy in the top 1, 95% in the top 2, 100% in the top 3, so the
# 90% and 99% effective ranks (2 and 3) sit well clear of either threshold.
PLANTED = (5.0, 2.0, 1.2)


def module_name(layer: int, kind: str = "q_proj") -> str:
    return f"model.layers.{layer}.self_attn.{kind}"


def orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))[0]


def planted_pair(out_features: int, in_features: int, singular: tuple[float, ...], r: int, seed: int,
                 left: torch.Tensor | None = None, right: torch.Tensor | None = None):
    """(A, B) with B @ A = left diag(singular) right^T: rank len(singular) although r is larger."""
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular)
    left = orthonormal(out_features, rank, generator) if left is None else left
    right = orthonormal(in_features, rank, generator) if right is None else right
    b = torch.zeros(out_features, r, dtype=torch.float64)
    b[:, :rank] = left * torch.tensor(singular, dtype=torch.float64)
    a = torch.randn(r, in_features, generator=generator, dtype=torch.float64)  # rows past rank meet B's zeros
    a[:rank] = right.T
    return a.float(), b.float()


def random_pair(out_features: int, in_features: int, r: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_features, generator=generator), torch.randn(out_features, r, generator=generator)


def write_adapter(directory: Path, modules: dict, base: str | Path = "missing-org/missing-model",
                  r: int = 8, alpha: float = 16.0, rslora: bool = False) -> Path:
    directory.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": r, "lora_alpha": alpha,
              "use_rslora": rslora, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "meta.json").write_text("{}")  # our checkpoints carry extra files; they must be ignored
    return directory


def write_base(directory: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    names = sorted(weights)
    if shards == 1:
        save_file({f"{name}.weight": weights[name].float() for name in names}, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"{name}.weight": weights[name].float() for name in names[shard::shards]}
        save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("rslora", [False, True])
def test_planted_rank_is_recovered(tmp_path, rslora):
    a, b = planted_pair(40, 48, PLANTED, r=8, seed=0)
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): (a, b)}, rslora=rslora)
    entry = analyze([adapter])["adapters"][0]["modules"][module_name(0)]
    scaling = 16.0 / math.sqrt(8) if rslora else 16.0 / 8
    assert entry["scaling"] == pytest.approx(scaling)
    assert entry["effective_rank"]["0.99"] == 3
    assert entry["effective_rank"]["0.9"] == 2
    singular = entry["singular_values"]
    assert singular[:3] == pytest.approx([scaling * value for value in PLANTED], rel=1e-5)
    assert max(singular[3:]) < 1e-6 * singular[0]
    assert entry["dW_fro"] == pytest.approx(scaling * math.sqrt(sum(v * v for v in PLANTED)), rel=1e-5)


@pytest.mark.parametrize("flat_modules, expected_r", [(1, 2), (2, 4)])
def test_suggestion_needs_most_modules(tmp_path, flat_modules, expected_r):
    # Planted modules reach 90% at r=2; flat ones (4 equal directions) only at r=4. With 5 modules,
    # 4/5 meeting r=2 is enough (>= 80%), 3/5 is not.
    modules = {module_name(layer): planted_pair(32, 32, PLANTED, r=8, seed=layer) for layer in range(5)}
    for layer in range(flat_modules):
        modules[module_name(layer)] = planted_pair(32, 32, (1.0, 1.0, 1.0, 1.0), r=8, seed=layer)
    suggestion = analyze([write_adapter(tmp_path / "adapter", modules)])["adapters"][0]["suggestion"]
    assert suggestion["r"] == expected_r
    assert suggestion["modules"] == 5
    assert suggestion["modules_meeting"] >= 4
    assert suggestion["trained_r"] == 8


def test_self_similarity_is_one(tmp_path):
    modules = {module_name(layer): random_pair(24, 40, r=8, seed=layer) for layer in range(2)}
    adapter = write_adapter(tmp_path / "adapter", modules)
    similarity = analyze([adapter, adapter])["similarity"]
    assert set(similarity) == set(modules)
    for result in similarity.values():
        phi = torch.tensor(result["phi"])
        assert phi.shape == (8, 8)
        assert torch.allclose(phi.diagonal(), torch.ones(8, dtype=phi.dtype), atol=1e-5)


def test_independent_adapters_look_like_random_subspaces(tmp_path):
    # For random subspaces of a d-dim input space, E[phi(i, j)] = max(i, j) / d.
    d, layers = 256, 6
    first = {module_name(layer): random_pair(32, d, r=8, seed=layer) for layer in range(layers)}
    second = {module_name(layer): random_pair(32, d, r=8, seed=100 + layer) for layer in range(layers)}
    similarity = analyze([write_adapter(tmp_path / "one", first),
                          write_adapter(tmp_path / "two", second)])["similarity"]
    phi_8_8 = [result["phi"][7][7] for result in similarity.values()]
    assert 0.6 * 8 / d < sum(phi_8_8) / layers < 1.5 * 8 / d
    assert max(max(max(row) for row in result["phi"]) for result in similarity.values()) < 0.5


def test_shared_output_directions_show_in_phi_output_not_in_phi(tmp_path):
    # The same output directions (B's side), independent input directions (A's side): what a short run
    # on a pretrained base shows, where each adapter's A is still mostly its random initialisation.
    generator = torch.Generator().manual_seed(3)
    left = orthonormal(48, 3, generator)
    first = {module_name(0): planted_pair(48, 256, PLANTED, r=8, seed=1, left=left)}
    second = {module_name(0): planted_pair(48, 256, PLANTED, r=8, seed=2, left=left)}
    result = analyze([write_adapter(tmp_path / "one", first),
                      write_adapter(tmp_path / "two", second)])["similarity"][module_name(0)]
    assert result["phi_11_output"] == pytest.approx(1.0, abs=1e-5)
    assert result["phi_11"] < 0.2
    assert torch.tensor(result["phi_output"]).shape == (8, 8)


def test_phi_output_is_none_where_the_output_widths_differ(tmp_path):
    first = {module_name(0): random_pair(32, 64, r=4, seed=0)}
    second = {module_name(0): random_pair(16, 64, r=4, seed=1)}
    result = analyze([write_adapter(tmp_path / "one", first),
                      write_adapter(tmp_path / "two", second)])["similarity"][module_name(0)]
    assert result["phi_output"] is None and result["phi_11_output"] is None
    assert torch.tensor(result["phi"]).shape == (4, 4)


def test_amplification_is_larger_for_directions_w_does_not_emphasise(tmp_path):
    size, generator = 64, torch.Generator().manual_seed(7)
    left, right = orthonormal(size, size, generator), orthonormal(size, size, generator)
    weight_singular = torch.linspace(10.0, 0.1, size, dtype=torch.float64)
    weight = left @ torch.diag(weight_singular) @ right.T
    base = write_base(tmp_path / "base", {module_name(0): weight})
    aligned = planted_pair(size, size, (3.0, 2.0), r=8, seed=1, left=left[:, :2], right=right[:, :2])
    unaligned = planted_pair(size, size, (3.0, 2.0), r=8, seed=1, left=left[:, -2:], right=right[:, -2:])
    report = analyze([write_adapter(tmp_path / "aligned", {module_name(0): aligned}, base=base),
                      write_adapter(tmp_path / "unaligned", {module_name(0): unaligned}, base=base)])
    on_top, on_bottom = (adapter["modules"][module_name(0)] for adapter in report["adapters"])
    top_energy = float(weight_singular[:2].square().sum().sqrt())
    for entry in (on_top, on_bottom):
        assert entry["amplification"]["k"] == 2
        assert entry["amplification"]["projection_W_top_directions"] == pytest.approx(top_energy, rel=1e-4)
        assert entry["amplification"]["projection_random_directions"] < top_energy
        assert entry["relative_update"] == pytest.approx(entry["dW_fro"] / float(torch.linalg.norm(weight)), rel=1e-4)
    # dW along W's top directions: U^T W V is W's top-2 block; along its weakest: nearly nothing.
    assert on_top["amplification"]["projection_dW_directions"] == pytest.approx(top_energy, rel=1e-4)
    assert on_bottom["amplification"]["projection_dW_directions"] < 0.1 * top_energy
    assert on_bottom["amplification"]["factor"] > 20 * on_top["amplification"]["factor"]
    assert report["adapters"][0]["base"]["found"] and "unquantised" in report["adapters"][0]["base"]["note"]


def test_cli_writes_json_figures_and_table(tmp_path):
    names = [module_name(layer, kind) for layer in range(3) for kind in ("q_proj", "v_proj")]
    weights = {name: torch.randn(32, 48, generator=torch.Generator().manual_seed(3)) for name in names}
    base = write_base(tmp_path / "base", weights, shards=2)
    first = write_adapter(tmp_path / "first", {name: planted_pair(32, 48, PLANTED, 8, seed) for seed, name in
                                               enumerate(names)}, base=base)
    second = write_adapter(tmp_path / "second", {name: random_pair(32, 48, 8, seed) for seed, name in
                                                 enumerate(names)}, base=base)
    out = tmp_path / "out"
    result = run_cli(["launch/analyze.py", str(first), str(second), f"out={out}", "threshold=0.9"], timeout=300)
    assert "eff-rank@99%" in result.stdout and "phi(1,1)" in result.stdout
    assert "layers.2.self_attn.v_proj" in result.stdout
    assert "suggestion: r=2 keeps >=90% of the update energy in 6/6 modules" in result.stdout
    report = json.loads((out / "analysis.json").read_text())
    assert report["adapters"][0]["modules"][names[0]]["W_fro"] > 0  # read through the sharded index
    assert report["adapters"][0]["suggestion"]["r"] == 2
    assert set(report["similarity"]) == set(names)
    for figure in ("spectra.png", "energy.png", "similarity.png", "top_direction.png"):
        data = (out / figure).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, figure


def test_figures_draw_the_numbers_analysis_json_holds(tmp_path, monkeypatch):
    from trainer.analysis import figures

    names = [module_name(layer, kind) for layer in range(3) for kind in ("q_proj", "v_proj")]
    first = write_adapter(tmp_path / "first", {name: planted_pair(32, 48, PLANTED, 8, seed) for seed, name in
                                               enumerate(names)})
    second = write_adapter(tmp_path / "second", {name: random_pair(32, 48, 8, seed) for seed, name in
                                                 enumerate(names)})
    drawn, save = {}, figures._save

    def keep(figure, title: str, path: Path) -> Path:  # the matplotlib Figure behind each PNG
        drawn[path.name] = figure
        return save(figure, title, path)

    monkeypatch.setattr(figures, "_save", keep)
    written = figures.write_outputs(analyze([first, second]), tmp_path / "out")
    assert [path.name for path in written] == ["analysis.json", *drawn]
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    adapters, similarity = report["adapters"], report["similarity"]
    kinds = ["self_attn.q_proj", "self_attn.v_proj"]

    def panels(name: str) -> dict:
        visible = [axis for axis in drawn[name].axes if axis.get_visible()]
        assert [axis.get_title() for axis in visible] == kinds
        return dict(zip(kinds, visible))

    def curves(axis, styles=("-", "--")) -> list[tuple[str, list[float]]]:
        """The data lines of a panel (not its guide lines), as (style, values), in drawing order."""
        return [(line.get_linestyle(), list(line.get_ydata())) for line in axis.lines
                if line.get_linestyle() in styles and line.get_color() not in ("grey", "firebrick")]

    def expected(values_of) -> dict[str, list[tuple[str, list[float]]]]:
        return {kind: [(style, values_of(adapter["modules"][name]))
                       for adapter, style in zip(adapters, ("-", "--")) for name in names if name.endswith(kind)]
                for kind in kinds}

    def assert_drawn(got: list[tuple[str, list[float]]], want: list[tuple[str, list[float]]]) -> None:
        assert [style for style, _ in got] == [style for style, _ in want]
        for (_, values), (_, reference) in zip(got, want):
            assert values == pytest.approx(reference, rel=1e-5)

    # Spectra: sigma_i / sigma_1 per module, floored at 1e-6 (the planted rank-3 updates reach it).
    spectra = expected(lambda entry: [max(value / entry["singular_values"][0], 1e-6)
                                      for value in entry["singular_values"]])
    for kind, axis in panels("spectra.png").items():
        assert (axis.get_xlabel(), axis.get_ylabel(), axis.get_yscale()) == ("singular value index i",
                                                                             "sigma_i / sigma_1", "log")
        assert_drawn(curves(axis), spectra[kind])
    legend = panels("spectra.png")[kinds[0]].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["layer 0", "layer 1", "layer 2"]

    # Energy: the cumulative shares, the 90%/99% levels and each adapter's suggested r.
    energy = expected(lambda entry: entry["cumulative_energy"])
    suggested = sorted(adapter["suggestion"]["r"] for adapter in adapters)
    assert suggested[0] == 2 < suggested[1]  # planted, random: two lines to tell apart
    for kind, axis in panels("energy.png").items():
        assert_drawn(curves(axis), energy[kind])
        levels = sorted(line.get_ydata()[0] for line in axis.lines if line.get_color() == "grey")
        assert levels == pytest.approx([0.9, 0.99])
        assert sorted(line.get_xdata()[0] for line in axis.lines if line.get_color() == "firebrick") == suggested

    # Similarity: a heat map per module, a row per kind and a column per layer, of the phi matrix.
    maps = [axis for axis in drawn["similarity.png"].axes if axis.images]
    assert [axis.get_title() for axis in maps[:3]] == ["layer 0", "layer 1", "layer 2"]
    assert [maps[0].get_ylabel(), maps[3].get_ylabel()] == [f"{kind}\ni (adapter 1)" for kind in kinds]
    by_row = [module_name(layer, kind) for kind in ("q_proj", "v_proj") for layer in range(3)]
    for axis, name in zip(maps, by_row, strict=True):
        phi = torch.tensor(similarity[name]["phi"], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(axis.images[0].get_array()), phi, rtol=1e-5, atol=1e-7,
                                   msg=lambda message, name=name: f"{name}: {message}")

    # Top direction: phi(1, j), adapter 1's first row of phi, against the random-subspace line j / 48.
    top = {kind: [("-", similarity[name]["phi"][0]) for name in names if name.endswith(kind)] for kind in kinds}
    for kind, axis in panels("top_direction.png").items():
        assert_drawn(curves(axis, ("-",)), top[kind])
        (reference,) = [line for line in axis.lines if line.get_color() == "grey"]
        assert list(reference.get_ydata()) == pytest.approx([j / 48 for j in range(1, 9)])


def test_missing_base_still_reports_and_default_out_dir(tmp_path):
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)},
                            base="missing-org/missing-model")
    result = run_cli(["launch/analyze.py", str(adapter)], timeout=300)
    assert "base model 'missing-org/missing-model' not found" in result.stdout
    report = json.loads((adapter / "analysis" / "analysis.json").read_text())
    entry = report["adapters"][0]["modules"][module_name(0)]
    assert entry["relative_update"] is None and entry["amplification"] is None
    assert entry["effective_rank"]["0.99"] == 3
    assert not (adapter / "analysis" / "similarity.png").exists()
    # base= overrides the adapter's base_model_name_or_path
    base = write_base(tmp_path / "base", {module_name(0): torch.eye(16)})
    run_cli(["launch/analyze.py", str(adapter), f"base={base}", f"out={tmp_path / 'with_base'}"], timeout=300)
    report = json.loads((tmp_path / "with_base" / "analysis.json").read_text())
    assert report["adapters"][0]["modules"][module_name(0)]["W_fro"] == pytest.approx(4.0)


def test_builtin_base_is_resolved(tmp_path, tiny_base):
    # Adapters trained on the built-in base name it "builtin:tiny-llama"; W must come from that build.
    from safetensors import safe_open

    with safe_open(str(tiny_base / "model.safetensors"), framework="pt") as weights:
        shapes = {key.removesuffix(".weight"): weights.get_slice(key).get_shape() for key in weights.keys()
                  if key.endswith(("q_proj.weight", "v_proj.weight"))}
    modules = {name: random_pair(shape[0], shape[1], r=4, seed=index)
               for index, (name, shape) in enumerate(sorted(shapes.items()))}
    report = analyze([write_adapter(tmp_path / "adapter", modules, base="builtin:tiny-llama", r=4)])
    adapter = report["adapters"][0]
    assert adapter["base"]["found"] and Path(adapter["base"]["path"]) == tiny_base
    assert all(entry["relative_update"] > 0 and entry["amplification"]["k"] >= 1
               for entry in adapter["modules"].values())


def test_zero_update_is_reported_not_crashed(tmp_path):
    a, b = random_pair(16, 16, r=8, seed=0)
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): (a, torch.zeros_like(b))})
    report = analyze([adapter])
    entry = report["adapters"][0]["modules"][module_name(0)]
    assert entry["effective_rank"]["0.9"] == 0 and entry["dW_fro"] == 0
    assert report["adapters"][0]["suggestion"] is None


def test_missing_files_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnalysisError, match=str(empty / "adapter_config.json")):
        load_adapter(empty)
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    with pytest.raises(AnalysisError, match=str(empty / "adapter_model.safetensors")):
        load_adapter(empty)
    result = run_cli(["launch/analyze.py", str(tmp_path / "nowhere")], timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr


def test_lora_a_without_lora_b_names_the_key(tmp_path):
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): random_pair(8, 8, 4, 0)}, r=4)
    lonely = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)}
    save_file(lonely, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AnalysisError, match=r"model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight has no matching"):
        load_adapter(adapter)


def test_runs_without_deepspeed(tmp_path):
    # The analysis reads adapter files only; it must work where DeepSpeed is not installed.
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)})
    script = ("import sys; sys.modules['deepspeed'] = None\n"  # any `import deepspeed` now fails
              "from trainer.analysis.ranks import analyze; from trainer.analysis.figures import write_outputs\n"
              f"write_outputs(analyze([{str(adapter)!r}]), __import__('pathlib').Path({str(tmp_path / 'out')!r}))")
    run_cli(["python", "-c", script], timeout=300)
    assert (tmp_path / "out" / "spectra.png").is_file()


def test_out_that_is_a_file_is_one_message_and_exit_2_before_the_analysis(tmp_path):
    adapter = write_adapter(tmp_path / "adapter", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)})
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    for out in (taken, taken / "below"):
        result = run_cli(["launch/analyze.py", str(adapter), f"out={out}"], timeout=300, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"error: out={out}: " in result.stderr and "pass out=<a directory" in result.stderr
        assert "adapter 1:" not in result.stdout  # refused before the analysis, not after it


def test_a_base_converted_from_gguf_is_not_called_full_precision(tmp_path, capsys):
    from trainer.analysis.figures import print_report
    from trainer.model.gguf import MARKER

    base = write_base(tmp_path / "base", {module_name(0): torch.eye(16)})
    (base / MARKER).write_text(json.dumps({"version": 2, "sha256": "0" * 64, "source": "Small.Q4_1.gguf"}))
    report = analyze([write_adapter(tmp_path / "adapter", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)},
                                    base=base)])
    info = report["adapters"][0]["base"]
    assert info["found"] and info["gguf_source"] == "Small.Q4_1.gguf"
    assert "dequantised to float32 from a GGUF file (Small.Q4_1.gguf)" in info["note"]
    assert "exact full-precision" not in info["note"]
    print_report(report)
    assert "note: W is read from the base's safetensors files, dequantised" in capsys.readouterr().out


def test_two_adapters_with_long_paths_each_get_a_title_line(tmp_path, monkeypatch):
    from trainer.analysis import figures

    deep = tmp_path / ("a-rather-long-directory-name-" * 2)
    modules = {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)}
    first, second = write_adapter(deep / "first", modules), write_adapter(deep / "second", modules)
    titles = {}

    def keep_title(figure, title: str, path: Path) -> Path:
        titles[path.name] = title
        return path

    monkeypatch.setattr(figures, "_save", keep_title)
    figures.write_outputs(analyze([first, second]), tmp_path / "out")
    for name, first_label, second_label in (("similarity.png", "adapter 1 (rows i): ", "adapter 2 (columns j): "),
                                            ("top_direction.png", "adapter 1: ", "adapter 2: ")):
        lines = titles[name].splitlines()
        assert lines[-2] == f"{first_label}{figures._label(str(first))} (r=8)", name
        assert lines[-1] == f"{second_label}{figures._label(str(second))} (r=8)", name


def test_a_mistyped_adapter_is_named_and_nothing_is_made_inside_it(tmp_path):
    missing = tmp_path / "run" / "step-40O"
    result = run_cli(["launch/analyze.py", str(missing)], timeout=300, check=False)
    assert result.returncode == 2 and f"adapter directory not found: {missing}" in result.stderr, result.stderr
    assert not missing.exists()  # its default out=<adapter>/analysis was not made


def test_a_run_checkpoint_is_analysed_beside_the_checkpoints_and_best_as_the_step_it_names(tmp_path):
    """keep_last prunes checkpoints: an analysis written inside one would go with it. Without out=, a
    run's checkpoint is analysed into <run>/analysis/step-<N>; `best` is read as the step it names, and
    recorded so; a run's folder is answered with its best checkpoint, as eval answers it."""
    run = tmp_path / "run"
    step = write_adapter(run / "checkpoints" / "step-60", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)})
    (run / "checkpoints" / "best").symlink_to("step-60")
    result = run_cli(["launch/analyze.py", str(run / "checkpoints" / "best")], timeout=300)
    assert f"to {run / 'analysis' / 'step-60'}" in result.stdout
    report = json.loads((run / "analysis" / "step-60" / "analysis.json").read_text())
    assert report["adapters"][0]["path"] == str(step)
    assert not (step / "analysis").exists()
    refused = run_cli(["launch/analyze.py", str(run)], timeout=300, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"a run's folder: give {run / 'checkpoints' / 'best'}, its best checkpoint" in refused.stderr


def test_an_adapter_outside_a_run_keeps_its_own_analysis_folder_and_a_single_analysis_drops_a_pairs_figures(tmp_path):
    import sys

    from conftest import ROOT
    from trainer.analysis.figures import write_outputs

    sys.path.insert(0, str(ROOT / "launch"))
    import analyze as script

    first = write_adapter(tmp_path / "first", {module_name(0): planted_pair(16, 16, PLANTED, 8, 0)})
    second = write_adapter(tmp_path / "second", {module_name(0): planted_pair(16, 16, PLANTED, 8, 1)})
    assert script.default_out([first]) == first / "analysis"
    assert script.default_out([tmp_path / "r" / "checkpoints" / "step-1", tmp_path / "r" / "checkpoints" / "step-2"]) \
        == tmp_path / "r" / "analysis" / "step-1-vs-step-2"
    assert script.default_out([tmp_path / "r" / "checkpoints" / "step-1", tmp_path / "s" / "checkpoints" / "step-1"]) \
        == tmp_path / "r" / "analysis" / "step-1-vs-s-step-1"  # another run's: named with its run
    # a folder that is no run and holds no adapter gets the adapter message, not the run one
    (tmp_path / "bin_only").mkdir()
    (tmp_path / "bin_only" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(AnalysisError, match="expected a PEFT LoRA adapter directory"):
        script.checked(str(tmp_path / "bin_only"))
    out = tmp_path / "out"
    write_outputs(analyze([str(first), str(second)]), out)
    assert (out / "similarity.png").is_file() and (out / "top_direction.png").is_file()
    written = write_outputs(analyze([str(first)]), out)
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in written)  # no pair figures
