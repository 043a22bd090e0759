"""LoRA on the output projection (lm_head) of a base whose input embedding shares its weight
(tie_word_embeddings, as SmolLM2's): in training the adapter changes the logits only, the token
vectors the model reads stay the base's. Merging must keep it so: the head gets a merged copy, the
embedding keeps the base weight, and the merged model (safetensors or GGUF) says the two are untied."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from _checkpoints import one_thread
from trainer.evaluation.export import merge_to_plain
from trainer.evaluation.gguf_export import write_gguf
from trainer.model.adapters import lora_layers, ties_adapted_layer
from trainer.model.lora import LoRALinear, apply_lora

IDS = [1, 5, 77, 300, 12, 99, 40, 41, 42]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def tied_tiny_base(tiny_base: Path) -> nn.Module:
    """The tests' tiny base loaded with its input and output embeddings tied (one tensor)."""
    from transformers import AutoModelForCausalLM

    # The tiny base is saved untied (two different tensors, which transformers will not tie on
    # load): tie them here, as a tied base (SmolLM2) loads.
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


def adapt_head(model: nn.Module, dora: bool) -> None:
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "lm_head"], r=4, alpha=8, dora=dora)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector))


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("dora", [False, True])
def test_merging_an_adapted_tied_head_leaves_the_input_embedding_at_the_base(tiny_base, dora):
    model = tied_tiny_base(tiny_base)
    embedding = model.model.embed_tokens.weight.detach().clone()
    adapt_head(model, dora)
    assert isinstance(model.lm_head, LoRALinear) and ties_adapted_layer(model)
    expected = logits_of(model)

    model.lm_head.merge()
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the head's update is the head's alone
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-5, atol=1e-5)
    model.lm_head.unmerge()  # under DoRA too: the tiny base's all-zero padding row comes back (dora.kept_for_unmerge)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_export_of_an_adapted_tied_head_unties_it_in_the_saved_model(tmp_path, tiny_base, dora):
    from transformers import AutoModelForCausalLM

    model = tied_tiny_base(tiny_base)
    embedding = model.model.embed_tokens.weight.detach().clone()
    adapt_head(model, dora)
    expected = logits_of(model)

    merged = merge_to_plain(model)
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.model.embed_tokens.weight, embedding)
    assert not torch.equal(merged.lm_head.weight, embedding)
    torch.testing.assert_close(logits_of(merged), expected, rtol=1e-5, atol=1e-5)

    out = tmp_path / "merged"
    merged.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    fresh = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(fresh.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(logits_of(fresh), expected, rtol=1e-5, atol=1e-5)


def test_gguf_export_of_an_adapted_tied_head_writes_the_output_weight(tmp_path, tiny_base):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tied_tiny_base(tiny_base)
    adapt_head(model, dora=False)
    expected = logits_of(model)
    path = write_gguf(merge_to_plain(model), AutoTokenizer.from_pretrained(tiny_base), tmp_path / "tied.gguf", "f32")

    names = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    assert {"token_embd.weight", "output.weight"} <= names  # llama.cpp would reuse token_embd without it
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(back), expected, rtol=0, atol=1e-4)


def test_an_untied_base_is_not_reported_as_tied(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    adapt_head(model, dora=False)
    assert not ties_adapted_layer(model)
