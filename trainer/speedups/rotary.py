"""Rotary position embedding in fewer passes, for training: `use_fused_rotary(model)`.

transformers' `apply_rotary_pos_emb` computes x * cos + rotate_half(x) * sin, where rotate_half
slices x in two halves, negates the second and concatenates them in swapped order. Autograd's backward
of that runs every step again and more (each slice's backward zero-fills a full-size tensor, the
concatenation's splits, the negation, two products, the sums), per layer for q and for k, on
[tokens x heads x head_dim] tensors. `Rotary` writes x * cos once and adds each half's partner times
sin into it in place (with rotate_half's sign); its backward is the transposed rotation,
grad * cos plus the swapped halves times sin with the opposite signs. It keeps cos and sin only
(autograd keeps them too; neither needs a gradient). On SmolLM2's shapes (9 query and 3 key/value heads
of 64, 1,400 tokens, fp32, one thread) forward and backward of q and k take 4.4 ms against 7.0-7.3 ms
per layer.

The forward gives transformers' numbers bit for bit (each product rounded, then added, as there).
The backward's addcmul_ may add a product before rounding it (a fused multiply-add; in bf16/fp16 it
computes in fp32 and rounds once): gradients differ from autograd's by a rounding of their dtype.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.utils.deprecation import deprecate_kwarg

from trainer.speedups import projections
from trainer.speedups.fused import _replace_forward

# Attention modules whose forward is LlamaAttention's and whose rotary is Llama's rotate_half formula.
# Many others have the same forward source but call their own module's rotary, which may rotate part
# of the head (GLM) or interleaved pairs; Mistral's and Qwen2's forwards also pass a sliding window.
PLAIN_ROTARY_ATTENTIONS = ("LlamaAttention",)


class Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, for cos and sin already broadcastable to x and not trained."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        # Each product rounded on its own, then added (not addcmul_, which may fuse the two roundings):
        # transformers' numbers bit for bit, so a held-out loss scored in training (with this op)
        # equals the one eval.py scores (without it), in bf16 too.
        out[..., :half].sub_(x[..., half:] * sin[..., :half])
        out[..., half:].add_(x[..., :half] * sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # The rotation's transpose: x1 fed out1 through cos and out2 through +sin; x2 fed out2 through
        # cos and out1 through -sin.
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


def apply_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim)` through `Rotary`."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad or any(
            torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape for x in (query, key)):
        # A trained rotary, or cos/sin that widen q or k: `Rotary` returns neither a gradient for
        # cos and sin nor one summed back to a broadcast x.
        rotate_half = modeling_llama.rotate_half
        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
    return Rotary.apply(query, cos, sin), Rotary.apply(key, cos, sin)


@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as on LlamaAttention.forward
def _llama_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                             attention_mask: torch.Tensor | None = None, cache=None, fused_qkv: bool = False,
                             **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LlamaAttention.forward (transformers 5), its rotary through `Rotary`; with `fused_qkv`, q, k and
    v through trainer/speedups/projections.py where it applies."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    projected = (projections.project(self, projections.QKV, hidden_states) if fused_qkv
                 else [getattr(self, name)(hidden_states) for name in projections.QKV])
    if fused_qkv:
        # Attention keeps v for its backward: a view of the stacked q, k, v result would keep q's and k's
        # columns alive with it (the unfused layers' q and k are freed once the rotary has read them).
        projected[2] = projected[2].contiguous()
    query_states, key_states, value_states = (states.view(hidden_shape).transpose(1, 2) for states in projected)
    del projected  # or q and k as projected (and, fused, the stacked result) would live as long as this forward

    cos, sin = position_embeddings
    query_states, key_states = apply_rotary(query_states, key_states, cos, sin)

    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_llama.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def use_fused_rotary(model: nn.Module, fused_qkv: bool = False) -> int:
    """Give every `PLAIN_ROTARY_ATTENTIONS` module the forward whose rotary is `Rotary` (and, with
    `fused_qkv`, whose q, k and v are one product where trainer/speedups/projections.py applies).
    Returns how many were changed."""
    return _replace_forward(model, PLAIN_ROTARY_ATTENTIONS,
                            functools.partial(_llama_attention_forward, fused_qkv=True) if fused_qkv
                            else _llama_attention_forward, lambda module: True)
