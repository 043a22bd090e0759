"""Leaner training ops for the Llama family's SwiGLU MLP, RMSNorm and rotary embeddings: fewer
elementwise passes over the activations, and less kept for the backward, than autograd's.

SwiGLU: transformers' Llama-family MLP computes down(act(gate(x)) * up(x)), and autograd then keeps
three [tokens x intermediate] tensors for the backward: gate(x), act(gate(x)) and up(x). `SiluMul`
keeps gate(x) and up(x) and recomputes the SiLU in the backward (one elementwise pass), so each
layer holds one intermediate-sized activation less. The result and the gradients are the same
numbers: the backward runs the same kernels autograd would.

RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), as transformers' `LlamaRMSNorm` computes it (in
fp32, the result cast back to x's dtype before the weight). It keeps what autograd keeps (x and one
number per token), but autograd's backward of those six operations takes about a dozen passes over
[tokens x hidden] (expanded and accumulated gradients included); `RMSNormFunction`'s takes six.
Same forward numbers; gradients equal up to float rounding (the backward sums in another order).

Rotary embeddings: transformers' `apply_rotary_pos_emb` computes x * cos + rotate_half(x) * sin with
rotate_half(x) = cat(-x2, x1); in the backward each half-slice becomes a zero-filled full-size
gradient, then both are added. `rotate_half(x) * sin` is also roll(x, half) * cat(-sin1, sin2): a
roll's backward is one roll, and the sign moves onto the small [positions x head_dim] table. The
same numbers, bit for bit, forward and backward; `use_fused_rotary` swaps the function into a
model's modeling module only after checking exactly that on a probe.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

# MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)). Matching by class, not by
# attribute names: other MLPs with the same parts also scale or clamp (Falcon-H1, DeepSeek-V4, ...).
PLAIN_SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP")
# Norms whose forward is exactly LlamaRMSNorm's. Not Gemma's (1 + weight), Olmo2's (weight before the
# cast) or Cohere's (a mean-centred LayerNorm).
PLAIN_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                  "Qwen3RMSNorm", "GraniteRMSNorm", "Phi3RMSNorm")


class SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm weight (never the frozen base's)
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x), applied to g = grad * weight: rstd * (g - normed * mean(g * normed)).
            scaled = (grad * weight).float()
            projection = (scaled * normed).mean(-1, keepdim=True)
            grad_x = scaled.sub_(normed.mul_(projection)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def use_fused_mlp(model: nn.Module) -> int:
    """Give every plain SwiGLU MLP (`PLAIN_SWIGLU_MLPS` with a SiLU activation) the fused forward.
    Other MLPs are left as they are. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in PLAIN_SWIGLU_MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)


def use_fused_norm(model: nn.Module) -> int:
    """Give every `PLAIN_RMSNORMS` module the one-op forward. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in PLAIN_RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            changed += 1
    return changed


def _is_silu(activation: nn.Module | None) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation (F.silu), or torch's nn.SiLU.
    return isinstance(activation, nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama `apply_rotary_pos_emb`, same arguments and numbers (see the module docstring)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def use_fused_rotary(model: nn.Module) -> int:
    """Use `apply_rotary_pos_emb` in the modeling modules of `model`'s layers whose own function gives
    exactly its numbers on a probe, values and gradients (partial or interleaved rotary do not, and
    are left alone). The swap is by module, so it holds for every model of that family in this
    process; the numbers being identical, nothing else notices. Returns how many modules changed."""
    changed = 0
    for name in sorted({type(module).__module__ for module in model.modules()}):
        namespace = sys.modules.get(name)
        original = getattr(namespace, "apply_rotary_pos_emb", None)
        if original is None or original is apply_rotary_pos_emb or not _same_rotary(original):
            continue
        namespace.apply_rotary_pos_emb = apply_rotary_pos_emb
        changed += 1
    return changed


def _same_rotary(original) -> bool:
    """Same values and gradients as ours on a probe with cos/sin over the whole head, and the same on
    one over half of it (a partial-rotary function rotates part of the head where ours fails)."""
    return all(_rotary_outcome(original, rotary_dim) == _rotary_outcome(apply_rotary_pos_emb, rotary_dim)
               for rotary_dim in (8, 4))


def _rotary_outcome(function, rotary_dim: int) -> tuple | str:
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 8, generator=generator, requires_grad=True) for _ in range(2))
    angles = torch.randn(2, 5, rotary_dim // 2, generator=generator)
    cos, sin = torch.cat((angles.cos(),) * 2, dim=-1), torch.cat((angles.sin(),) * 2, dim=-1)
    grads = tuple(torch.randn(2, 2, 3, 5, 8, generator=generator))
    try:
        out = function(q, k, cos, sin)
        return tuple(tuple(t.flatten().tolist()) for t in (*out, *torch.autograd.grad(out, (q, k), grads)))
    except Exception:  # another signature, or shapes it does not take
        return "fails"
