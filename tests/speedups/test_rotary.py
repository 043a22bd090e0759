"""The fused rotary embedding (trainer/speedups/rotary.py) is transformers' in value and gradients, and
a Llama model with it trains and decodes as without it."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding

from tests.speedups.test_fused import lora_model
from tests.test_loss import examples  # noqa: F401  (a fixture)
from trainer.data.packing import collate_packed
from trainer.loss import CausalLMLoss
from trainer.model.adapters import adapter_parameters
from trainer.speedups.rotary import Rotary, apply_rotary, use_fused_rotary


def rotary_inputs(dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, head_dim: int = 16):
    """q and k as attention makes them, views [B, heads, L, D] transposed from the projections'
    [B, L, heads, D]; cos and sin for packed rows whose positions restart per example."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    position_ids = torch.cat([torch.arange(n) for n in (5, 9, 3)]).expand(2, -1)
    length = position_ids.shape[1]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros((), dtype=dtype), position_ids)
    query_projection = torch.randn(2, length, heads * head_dim, dtype=dtype, requires_grad=True)
    key_projection = torch.randn(2, length, kv_heads * head_dim, dtype=dtype, requires_grad=True)
    query = query_projection.view(2, length, heads, head_dim).transpose(1, 2)
    key = key_projection.view(2, length, kv_heads, head_dim).transpose(1, 2)
    grads = torch.randn_like(query), torch.randn_like(key)
    return (query_projection, key_projection), (query, key), (cos, sin), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_transformers_rotary_in_value_and_gradients(dtype):
    leaves, (query, key), (cos, sin), grads = rotary_inputs(dtype)
    assert not query.is_contiguous() and not key.is_contiguous()
    expected = modeling_llama.apply_rotary_pos_emb(query, key, cos, sin)
    expected_grads = torch.autograd.grad(expected, leaves, grads)
    fused = apply_rotary(query, key, cos, sin)
    fused_grads = torch.autograd.grad(fused, leaves, grads)
    for name, got, want in zip(("q", "k"), fused, expected):  # the forward: bit for bit, in every dtype
        assert got.dtype == dtype and torch.equal(got, want), name
    # The backward's addcmul_ may round the product and the sum once, not twice: a rounding apart.
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    for name, got, want in zip(("q grad", "k grad"), fused_grads, expected_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tolerance, msg=lambda message, name=name: f"{name}: {message}")


def test_rotary_keeps_cos_and_sin_only():
    _, (query, _), (cos, sin), _ = rotary_inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        Rotary.apply(query, cos.unsqueeze(1), sin.unsqueeze(1))
    assert len(saved) == 2 and all(tensor.shape == cos.unsqueeze(1).shape for tensor in saved)


def test_a_trained_rotary_gets_transformers_gradients_for_cos_and_sin():
    leaves, (query, key), (cos, sin), grads = rotary_inputs(torch.float32)
    cos, sin = cos.detach().requires_grad_(), sin.detach().requires_grad_()
    inputs = (*leaves, cos, sin)
    expected = torch.autograd.grad(modeling_llama.apply_rotary_pos_emb(query, key, cos, sin), inputs, grads)
    fused = torch.autograd.grad(apply_rotary(query, key, cos, sin), inputs, grads)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def count_rotary_calls(monkeypatch) -> list[int]:
    """Counts `Rotary` forwards and backwards; transformers' rotary may no longer run at all."""
    calls = [0, 0]
    forward, backward = Rotary.forward, Rotary.backward

    def counted_forward(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    def counted_backward(ctx, *args):
        calls[1] += 1
        return backward(ctx, *args)

    def unused(*args, **kwargs):
        raise AssertionError("transformers' apply_rotary_pos_emb ran in a model with the fused rotary")

    monkeypatch.setattr(Rotary, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(Rotary, "backward", staticmethod(counted_backward))
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", unused)
    return calls


def test_fused_rotary_keeps_loss_and_adapter_gradients(small_base_path, small_tokenizer, examples,  # noqa: F811
                                                       monkeypatch):
    batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
    plain = lora_model(small_base_path)
    plain_loss, _ = CausalLMLoss(plain)(**batch)
    plain_loss.backward()

    calls = count_rotary_calls(monkeypatch)
    fused = lora_model(small_base_path)
    assert use_fused_rotary(fused) == fused.config.num_hidden_layers
    fused_loss, _ = CausalLMLoss(fused)(**batch)
    fused_loss.backward()

    layers = fused.config.num_hidden_layers
    assert calls == [2 * layers, 2 * layers]  # q and k in every layer, forward and backward
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    fused_parameters = adapter_parameters(fused)
    for name, parameter in adapter_parameters(plain).items():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(fused_parameters[name].grad, parameter.grad, rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_fused_rotary_decodes_the_same_tokens_with_a_kv_cache(small_base_path, monkeypatch):
    prompt = torch.tensor([[1, 45, 67, 89, 12, 7], [1, 33, 8, 240, 5, 91]])
    new_tokens = 6

    def greedy(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, use_cache=True)

    plain_tokens = greedy(lora_model(small_base_path))
    calls = count_rotary_calls(monkeypatch)
    fused = lora_model(small_base_path)
    use_fused_rotary(fused)
    fused_tokens = greedy(fused)
    assert plain_tokens.shape == (2, prompt.shape[1] + new_tokens)
    assert torch.equal(fused_tokens, plain_tokens)
    # One rotary per token step through the cache (the prompt, then each new token but the last).
    assert calls == [2 * fused.config.num_hidden_layers * new_tokens, 0]


def test_only_transformers_own_llama_attention_is_changed():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    # A class of the same name from a model's own code (trust_remote_code) may compute something else.
    remote = type("LlamaAttention", (LlamaAttention,), {"__module__": "transformers_modules.someone.modeling_custom"})
    # Same forward source, but its module's own rotary rotates interleaved pairs, of part of each head.
    from transformers.models.glm4.modeling_glm4 import Glm4Attention, Glm4Config

    glm = Glm4Attention(Glm4Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2), layer_idx=0)
    assert use_fused_rotary(nn.ModuleList([remote(config, 0), glm])) == 0
    assert use_fused_rotary(nn.ModuleList([LlamaAttention(config, 0), LlamaAttention(config, 1), glm])) == 2
