"""The objective: chunked cross-entropy is exactly the full one, our loss is the model's own loss,
and activation checkpointing changes memory, not the adapters' gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.tasks import demo_rows
from trainer.recipe_loading import recipe_from_dict
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.batching import collate
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.model.lora import apply_lora
from trainer import loss as loss_module
from trainer.loss import CausalLMLoss, chunked_cross_entropy, fused_rows
from trainer.model.base import enable_activation_checkpointing
from trainer.model.base import load_base
from trainer.data.packing import collate_packed
from trainer.speedups import last_layer
from trainer.speedups import blocked_attention
from trainer.speedups.packed_attention import use_packed_attention


@pytest.fixture(scope="module")
def examples(small_tokenizer) -> list[Example]:
    examples = []
    for row_id, row in enumerate(demo_rows(6, seed=3)):
        prompt = [small_tokenizer.bos_token_id] + small_tokenizer(f"{row['instruction']}\n{row['input']}\n",
                                                      add_special_tokens=False)["input_ids"]
        response = small_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [small_tokenizer.eos_token_id]
        examples.append(Example(row_id, prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return examples


@pytest.fixture(scope="module")
def batch(small_tokenizer, examples) -> dict[str, torch.Tensor]:
    return collate(examples, small_tokenizer.pad_token_id)


def lora_model(small_base_path: str, bits: int) -> nn.Module:
    model, _ = load_base(recipe_from_dict({"model": {"name_or_path": small_base_path}, "quant": {"bits": bits}}),
                         torch.device("cpu"))
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8.0)
    for layer in lora_layers(model).values():  # B != 0: gradients reach A as well as B
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


@pytest.mark.parametrize("chunk_tokens,keep_logits_up_to", [(1, 0), (7, 0), (64, 0), (1000, 0), (7, 10**6)])
def test_chunked_cross_entropy_equals_full_in_value_and_gradients(chunk_tokens, keep_logits_up_to):
    # keep_logits_up_to=0: chunks recomputed in the backward; 10**6: small logits kept in one go.
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    full = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked, count = chunked_cross_entropy(head, hidden, targets, chunk_tokens, keep_logits_up_to)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])

    assert count == 37
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for got, expected in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_fused_loss_takes_cache_sized_chunks_on_cpu_and_larger_ones_on_a_gpu():
    assert fused_rows(49_152, torch.device("cpu")) == 170
    assert fused_rows(49_152, torch.device("cuda", 1)) == 682 and fused_rows(32_000, torch.device("cuda")) == 1_048
    assert fused_rows(2**26, torch.device("cpu")) == 1  # a vocabulary wider than a chunk: one row at a time


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.float32, 5), (torch.float32, 100),
                                        (torch.bfloat16, 8)])
def test_a_frozen_head_takes_the_fused_path_with_the_same_value_and_gradient(dtype, rows, monkeypatch):
    """FrozenHeadCrossEntropy: the input gradient worked out in the forward, chunk by chunk."""
    monkeypatch.setattr(loss_module, "FUSED_LOGITS_PER_CHUNK", rows * 50)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    calls = []
    original = loss_module.FrozenHeadCrossEntropy.forward
    monkeypatch.setattr(loss_module.FrozenHeadCrossEntropy, "forward",
                        staticmethod(lambda ctx, *args: calls.append(args[3]) or original(ctx, *args)))  # rows

    fused, count = chunked_cross_entropy(head, hidden, targets, chunk_tokens=4096)
    (fused * 3.0).backward()  # the upstream gradient scales the stored one
    assert calls == [rows] and count == 37
    expected_hidden = hidden.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(head(expected_hidden).float(), targets, reduction="sum")
    (expected * 3.0).backward()
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused, expected, **tolerance)
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, **tolerance)
    assert hidden.grad.dtype == dtype


def test_a_trainable_head_keeps_the_autograd_path():
    head = nn.Linear(16, 50, bias=False)  # requires grad: the fused path has no weight gradient
    hidden = torch.randn(9, 16, requires_grad=True)
    loss, _ = chunked_cross_entropy(head, hidden, torch.randint(0, 50, (9,)), chunk_tokens=4)
    loss.backward()
    assert head.weight.grad is not None and hidden.grad is not None
    assert type(loss.grad_fn).__name__ != "FrozenHeadCrossEntropyBackward"


def test_loss_is_the_models_own_loss_on_trained_tokens(small_base_path, batch):
    model = lora_model(small_base_path, bits=16)
    loss_sum, tokens = CausalLMLoss(model, chunk_tokens=5)(**batch)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert tokens == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss_sum / tokens, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,packed", [(16, False), (4, False), (16, True), (16, "blocked")])
def test_activation_checkpointing_keeps_adapter_gradients(small_base_path, small_tokenizer, examples, bits, packed,
                                                          monkeypatch):
    calls = []
    monkeypatch.setattr(blocked_attention, "attention",
                        lambda *args, original=blocked_attention.attention: calls.append(1) or original(*args))
    plain = lora_model(small_base_path, bits)
    checkpointed = lora_model(small_base_path, bits)
    enable_activation_checkpointing(checkpointed)
    batch = collate(examples, small_tokenizer.pad_token_id)
    if packed:  # attention per example is recomputed in the backward too
        batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
        use_packed_attention(plain, blocked=packed == "blocked")
        use_packed_attention(checkpointed, blocked=packed == "blocked")
    results = []
    for model in (plain, checkpointed):
        model.train()
        loss_sum, _ = CausalLMLoss(model)(**batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), adapter_parameters(model)))

    (plain_loss, plain_params), (checkpointed_loss, checkpointed_params) = results
    # blocked: each layer once per forward, the checkpointed one's again in the backward
    assert len(calls) == (3 * plain.config.num_hidden_layers if packed == "blocked" else 0)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    # non-reentrant: the embedding's output needs no grad (the first layer's input gradient would be waste)
    assert not checkpointed.get_input_embeddings()(batch["input_ids"][:, :2]).requires_grad
    assert torch.equal(checkpointed_loss, plain_loss)
    assert plain_params.keys() == checkpointed_params.keys()
    for name, parameter in plain_params.items():
        gradient = checkpointed_params[name].grad
        assert gradient is not None and gradient.abs().sum() > 0, name  # reentrant would give None here
        torch.testing.assert_close(gradient, parameter.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("bits,packed", [(16, False), (4, False), (16, True)])
def test_last_layer_on_trained_positions_only_keeps_loss_and_gradients(small_base_path, small_tokenizer, examples,
                                                                      bits, packed):
    batch = collate(examples, small_tokenizer.pad_token_id)
    if packed:
        batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    results = []
    for restricted in (False, True):
        model = lora_model(small_base_path, bits)
        if packed:
            use_packed_attention(model)
        if restricted:
            assert last_layer.attach(model)
        loss_model = CausalLMLoss(model)
        rows = []
        last = model.model.layers[-1]
        for module in (last.self_attn.o_proj.base_layer, last.mlp.down_proj):
            module.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[:-1].numel()))
        loss_sum, _ = loss_model(**batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), adapter_parameters(model), rows))
    (full_loss, full_params, full_rows), (loss, params, rows) = results
    assert rows == [trained] * 2 and full_rows[0] > 1.3 * trained  # the prompts and padding are skipped
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, parameter in full_params.items():
        assert params[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(params[name].grad, parameter.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_the_model_outside_the_loss_runs_its_last_layer_on_every_position(small_base_path, batch):
    model = lora_model(small_base_path, bits=16)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert last_layer.attach(model)
        CausalLMLoss(model)(**batch)  # runs the hooks
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_under_activation_checkpointing_the_last_layer_runs_on_every_position(small_base_path, batch):
    model = lora_model(small_base_path, bits=16)
    assert last_layer.attach(model)
    enable_activation_checkpointing(model)
    rows = []
    # up_proj's output is kept for the backward, so the recomputation goes at least that far.
    model.model.layers[-1].mlp.up_proj.register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel()))
    model.train()
    CausalLMLoss(model)(**batch)[0].backward()  # the recomputation in the backward runs outside the loss
    assert rows == [batch["input_ids"].numel()] * 2
