"""The objective: chunked cross-entropy is exactly the full one, our loss is the model's own loss,
and activation checkpointing changes memory, not the adapters' gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.builtin import demo_rows, ensure_tiny_base
from trainer.config import recipe_from_dict
from trainer.data import IGNORE_INDEX, Example, collate
from trainer.lora import adapter_parameters, apply_lora, lora_layers
from trainer.loss import CausalLMLoss, chunked_cross_entropy, enable_activation_checkpointing
from trainer.model import load_base, load_tokenizer
from trainer.packing import collate_packed, use_packed_attention


@pytest.fixture(scope="module")
def base_path(session_cache) -> str:
    return str(ensure_tiny_base("bench-tiny", hidden_size=64, intermediate_size=176, num_hidden_layers=2))


@pytest.fixture(scope="module")
def tokenizer(base_path):
    return load_tokenizer(base_path, recipe_from_dict({"model": {"name_or_path": base_path}}))


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    examples = []
    for row_id, row in enumerate(demo_rows(6, seed=3)):
        prompt = [tokenizer.bos_token_id] + tokenizer(f"{row['instruction']}\n{row['input']}\n",
                                                      add_special_tokens=False)["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(row_id, prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return examples


@pytest.fixture(scope="module")
def batch(tokenizer, examples) -> dict[str, torch.Tensor]:
    return collate(examples, tokenizer.pad_token_id)


def lora_model(base_path: str, bits: int) -> nn.Module:
    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": base_path}, "quant": {"bits": bits}}),
                         torch.device("cpu"))
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8.0)
    for layer in lora_layers(model).values():  # B != 0: gradients reach A as well as B
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_full_in_value_and_gradients(chunk_tokens):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    full = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked, count = chunked_cross_entropy(head, hidden, targets, chunk_tokens)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])

    assert count == 37
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for got, expected in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_loss_is_the_models_own_loss_on_trained_tokens(base_path, batch):
    model = lora_model(base_path, bits=16)
    loss_sum, tokens = CausalLMLoss(model, chunk_tokens=5)(**batch)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert tokens == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss_sum / tokens, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,packed", [(16, False), (4, False), (16, True)])
def test_activation_checkpointing_keeps_adapter_gradients(base_path, tokenizer, examples, bits, packed):
    plain = lora_model(base_path, bits)
    checkpointed = lora_model(base_path, bits)
    enable_activation_checkpointing(checkpointed)
    batch = collate(examples, tokenizer.pad_token_id)
    if packed:  # attention per example is recomputed in the backward too
        batch = collate_packed(examples, 64, tokenizer.pad_token_id)
        use_packed_attention(plain)
        use_packed_attention(checkpointed)
    results = []
    for model in (plain, checkpointed):
        model.train()
        loss_sum, _ = CausalLMLoss(model)(**batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), adapter_parameters(model)))

    (plain_loss, plain_params), (checkpointed_loss, checkpointed_params) = results
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    assert torch.equal(checkpointed_loss, plain_loss)
    assert plain_params.keys() == checkpointed_params.keys()
    for name, parameter in plain_params.items():
        gradient = checkpointed_params[name].grad
        assert gradient is not None and gradient.abs().sum() > 0, name  # reentrant would give None here
        torch.testing.assert_close(gradient, parameter.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda message, name=name: f"{name}: {message}")
