"""Bases that would load wrong are refused with one clear message: a GGUF file that is an adapter or
lacks weights (never converted into a random base), a mistyped built-in, a checkpoint quantised otherwise
than the recipe asks. And a `~` in model.name_or_path is the home directory."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from trainer.recipe_loading import recipe_from_dict
from trainer.evaluation.gguf_export import write_gguf
from trainer.model import gguf
from trainer.model.base import ModelLoadError, load_base, load_config, resolve_base


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def recipe(name_or_path: str, **quant) -> object:
    return recipe_from_dict({"model": {"name_or_path": name_or_path}, "quant": {"bits": 4, **quant}})


def small_model(small_base_path: str, tied: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(small_base_path, dtype=torch.float32, tie_word_embeddings=tied)
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(small_base_path)


def converted(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(path.name for path in models.iterdir()) if models.exists() else []


# ------------------------------------------------------------------------------------------ GGUF
def test_a_llama_cpp_lora_adapter_gguf_is_refused_as_a_base(cache: Path, tmp_path: Path) -> None:
    import gguf as gguf_package

    path = tmp_path / "adapter.gguf"
    writer = gguf_package.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"adapter\.gguf is a llama\.cpp LoRA adapter \(general\.type=adapter\), "
                                             r"not a base model: point model\.name_or_path at the base"):
        resolve_base(recipe(str(path)))
    assert converted(cache) == []


def test_a_gguf_missing_a_weight_is_refused_and_never_marked_converted(cache: Path, tmp_path: Path,
                                                                       small_base_path: str) -> None:
    model, tokenizer = small_model(small_base_path)
    state = {name: tensor for name, tensor in model.state_dict().items()
             if name != "model.layers.1.self_attn.v_proj.weight"}
    path = write_gguf(SimpleNamespace(config=model.config, state_dict=lambda: state), tokenizer,
                      tmp_path / "partial.gguf", "f32")
    for attempt in range(2):  # and not a cache that a second run would take as complete
        with pytest.raises(ModelLoadError, match=r"partial\.gguf lacks 1 weight\(s\) a LlamaForCausalLM needs "
                                                 r"\(model\.layers\.1\.self_attn\.v_proj\.weight\); converted, "
                                                 r"they would be random"):
            resolve_base(recipe(str(path)))
        assert converted(cache) == []


def test_a_complete_gguf_with_a_tied_output_layer_converts_to_its_own_weights(cache: Path, tmp_path: Path,
                                                                               small_base_path: str) -> None:
    model, tokenizer = small_model(small_base_path, tied=True)
    path = write_gguf(model, tokenizer, tmp_path / "tied.gguf", "f32")  # no output.weight: llama.cpp ties it
    directory = Path(gguf.converted_dir(path))
    assert (directory / gguf.MARKER).exists()
    weights = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert torch.equal(weights["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(weights["model.layers.1.mlp.down_proj.weight"], model.model.layers[1].mlp.down_proj.weight)


# ------------------------------------------------------------------------------- the name itself
def test_a_mistyped_builtin_is_one_line_naming_the_close_one() -> None:
    with pytest.raises(ModelLoadError) as raised:
        resolve_base(recipe("builtin:tiny-lama"))
    assert str(raised.value) == ("model.name_or_path: unknown built-in 'builtin:tiny-lama'; did you mean "
                                 "builtin:tiny-llama? known: builtin:tiny-llama, builtin:smollm2-135m, builtin:tasks")
    with pytest.raises(ModelLoadError, match=r"unknown built-in 'builtin:xyz'; known: builtin:tiny-llama"):
        resolve_base(recipe("builtin:xyz"))


def test_a_mistyped_builtin_exits_2_with_one_line() -> None:
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "model.name_or_path=builtin:tiny-lama",
                      "--dry-run"], timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: model.name_or_path: unknown built-in 'builtin:tiny-lama'; did you mean builtin:tiny-llama? "
        "known: builtin:tiny-llama, builtin:smollm2-135m, builtin:tasks"]


def test_a_base_under_the_home_directory_is_found_through_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  small_base_path: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "small").symlink_to(small_base_path)
    name_or_path = resolve_base(recipe("~/models/small"))
    assert name_or_path == str(tmp_path / "models" / "small")
    assert load_config(recipe("~/models/small"), name_or_path).hidden_size == 64


# --------------------------------------------------------------- a checkpoint quantised already
@pytest.fixture(scope="module")
def prequantized(small_base_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small base quantised by us (4-bit NF4, double quant) and saved: as a hub "-bnb-4bit" model is."""
    out = tmp_path_factory.mktemp("bnb-4bit")
    model, _ = load_base(recipe(small_base_path), torch.device("cpu"))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("quant, asked", [
    ({"bits": 8}, "8-bit \\(LLM.int8\\)"),
    ({"bits": 16}, "16-bit \\(no quantisation\\)"),
    ({"quant_type": "fp4"}, "4-bit fp4 with double quant, stored as uint8"),
    ({"double_quant": False}, "4-bit nf4, stored as uint8"),
])
def test_a_prequantized_checkpoint_the_recipe_would_quantise_otherwise_is_refused(prequantized, quant, asked):
    with pytest.raises(ModelLoadError, match=(
            r"is already quantised by bitsandbytes \(its config.json's quantization_config\): 4-bit nf4 with "
            rf"double quant, stored as uint8. It loads only as it was saved, and the recipe asks for {asked}: set "
            r"quant.bits=4 quant.quant_type=nf4 quant.double_quant=true to train on it as it is, or point "
            r"model.name_or_path at the unquantised original$")):
        load_base(recipe(str(prequantized), **quant), torch.device("cpu"))


def test_a_prequantized_checkpoint_loads_as_saved_computing_in_the_recipes_dtype(prequantized, small_base_path,
                                                                                 recwarn):
    ids = torch.tensor([[1, 5, 9, 12]])
    quantised_here, _ = load_base(recipe(small_base_path), torch.device("cpu"))
    loaded, _ = load_base(recipe(str(prequantized)), torch.device("cpu"))
    layer = loaded.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.compute_dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quantised_here(input_ids=ids).logits)
    assert not [w for w in recwarn if "quantization_config" in str(w.message)]  # ours is not passed to be ignored
    bf16, _ = load_base(recipe(str(prequantized), compute_dtype="bfloat16"), torch.device("cpu"))
    assert bf16.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16


def test_a_checkpoint_quantised_by_another_method_is_refused(tmp_path: Path, small_base_path: str) -> None:
    import json

    config = json.loads((Path(small_base_path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for bits in (4, 16):
        with pytest.raises(ModelLoadError, match=r"already quantised with gptq .*loads only bitsandbytes checkpoints: "
                                                 r"point model.name_or_path at the unquantised original"):
            load_base(recipe(str(tmp_path), bits=bits), torch.device("cpu"))
