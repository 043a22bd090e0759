"""LoRA on a scaled token embedding (Gemma's `GemmaTextScaledWordEmbedding`, which multiplies its lookups by
embed_scale = sqrt(hidden_size)): the update is scaled with the lookup, so the model we train computes
what merge, export and peft compute from the same adapter."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _checkpoints import one_thread, through_peft, tiny_recipe
from test_lora_variants import randomise
from trainer.model.adapters import lora_layers, merge_all
from trainer.model.lora import LoRALinear, apply_lora
from trainer.model.lora_embedding import LoRAEmbedding

IDS = [1, 45, 67, 89, 7, 30, 13, 13, 50, 7]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def gemma() -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    return GemmaForCausalLM(config).eval()


def adapted(model: nn.Module, dora: bool) -> nn.Module:
    apply_lora(model, ["embed_tokens", "q_proj"], r=4, alpha=8, dora=dora)
    for layer in lora_layers(model).values():
        randomise(layer)  # an update the size of the embedding's rows, so a missing factor of 8 shows
    return model


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits


def test_the_update_of_a_scaled_embedding_is_scaled_as_its_lookup():
    model = adapted(gemma(), dora=False)
    layer = model.model.embed_tokens
    base = layer.base_layer
    assert type(base).__name__ == "GemmaTextScaledWordEmbedding" and float(base.embed_scale) == 8.0
    ids = torch.tensor([IDS])
    expected = F.embedding(ids, base.weight + layer.delta_weight()) * base.embed_scale
    torch.testing.assert_close(layer(ids), expected, rtol=1e-6, atol=1e-5)


def test_a_plain_embedding_has_no_scale():
    layer = LoRAEmbedding(nn.Embedding(20, 8), r=2, alpha=4)
    assert layer.embed_scale() is None


@pytest.mark.parametrize("dora", [False, True])
def test_a_scaled_embeddings_adapter_gives_the_same_logits_unmerged_merged_exported_and_in_peft(tmp_path, dora):
    from transformers import AutoModelForCausalLM

    from trainer.evaluation.export import merge_to_plain

    model = gemma()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    model = adapted(model, dora)
    expected = logits_of(model)
    assert (expected - logits_of(AutoModelForCausalLM.from_pretrained(base_dir).eval())).abs().max() > 1.0

    recipe = tiny_recipe("lora.target_modules=[embed_tokens,q_proj]", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
                         f"lora.dora={str(dora).lower()}")
    peft_model = through_peft(model, recipe, base_dir, tmp_path / "adapter")  # our checkpoint layout, read by peft
    torch.testing.assert_close(logits_of(peft_model), expected, rtol=1e-5, atol=1e-4)

    to_export = copy.deepcopy(model)
    merge_all(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-5, atol=1e-4)

    out = tmp_path / "merged"
    merge_to_plain(to_export).save_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(module, (LoRALinear, LoRAEmbedding)) for module in exported.modules())
    torch.testing.assert_close(logits_of(exported), expected, rtol=1e-5, atol=1e-4)
