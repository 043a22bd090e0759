"""Leaner training ops for the Llama family's SwiGLU MLP and RMSNorm: less kept for the backward,
and fewer passes over the activations, than autograd's.

SwiGLU: transformers' Llama-family MLP computes down(act(gate(x)) * up(x)), and autograd then keeps
three [tokens x intermediate] tensors for the backward: gate(x), act(gate(x)) and up(x). `SiluMul`
keeps gate(x) and up(x) and recomputes the SiLU in the backward (one elementwise pass), so each
layer holds one intermediate-sized activation less. The result and the gradients are the same
numbers: the backward runs the same kernels autograd would.

RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), computed as transformers' `LlamaRMSNorm` does (in
fp32, cast back to x's dtype before the weight), so the forward gives the same numbers bit for bit.
It keeps x and one number per token (in fp32 what autograd keeps; in bf16/fp16 half of it, since
autograd also keeps x's fp32 copy). In fp32, autograd's backward of those operations takes about a
dozen passes over [tokens x hidden] (pow, mean, rsqrt and two products, each with expanded and
accumulated gradients); `RMSNormFunction`'s takes four: g = grad * weight, the dot product g . x per
token, g * rstd, and x times one number per token subtracted from it (16-bit inputs add the casts).
Only the classes named in `PLAIN_*` and defined by transformers are changed: a model's own code
(`trust_remote_code`) may reuse a name for something else. Gradients equal autograd's up to float
rounding (the sums run in another order).

With `kernels` (trainer/speedups/compiled.py, `train.compiled_kernels`) a training step runs each
op's passes as one compiled loop per direction: equal to the above up to float rounding, not bit for
bit. Evaluation and decoding (no gradients) keep the eager ops.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from trainer.speedups.compiled import Kernels

# MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)). Matching by class, not by
# attribute names: other MLPs with the same parts also scale or clamp (Falcon-H1, DeepSeek-V4, ...).
PLAIN_SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP")
# Norms whose forward is exactly LlamaRMSNorm's (tests/speedups/test_fused.py compares the source). Not Gemma's
# (1 + weight), Olmo2's (the weight applied before the cast) or Cohere's (a mean-centred LayerNorm).
PLAIN_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                  "Qwen3RMSNorm", "GraniteRMSNorm", "Phi3RMSNorm")


# Each op's passes, one function per direction: run as torch ops here, or compiled into one loop by
# trainer/speedups/compiled.py (`kernels`), which compiles these same functions.


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).mul_(up)


def silu_mul_grads(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool = True,
                   need_up: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    grad_up = F.silu(gate).mul_(grad) if need_up else None
    return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm's forward and the per-token rstd its backward needs."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_input_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    # d/dx of x * rstd(x), applied to g = grad * weight: g * rstd - x * rstd^3 * (g . x) / hidden.
    x32 = x.float()
    g = (grad * weight).float()
    per_token = torch.linalg.vecdot(g, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
    return g.mul_(rstd).addcmul_(x32, per_token, value=-1).to(x.dtype)


def _usable(kernels: Kernels | None) -> Kernels | None:
    return kernels if kernels and kernels.usable else None


class SiluMul(torch.autograd.Function):
    """silu(gate) * up. `kernels` (trainer/speedups/compiled.py): each direction as one compiled loop;
    None: torch's ops."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels: Kernels | None = None) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.kernels = _usable(kernels)
        return (ctx.kernels.silu_mul if ctx.kernels else silu_mul)(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        kernels = _usable(ctx.kernels)
        grads = (kernels.silu_mul_grads if kernels else silu_mul_grads)(grad, gate, up, *ctx.needs_input_grad[:2])
        return *grads, None


class RMSNormFunction(torch.autograd.Function):
    """LlamaRMSNorm's forward. `kernels` (trainer/speedups/compiled.py): each direction as one
    compiled loop (the forward then equal to transformers' up to float rounding, not bit for bit);
    None: torch's ops."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: Kernels | None = None) -> torch.Tensor:
        ctx.kernels = _usable(kernels)
        out, rstd = (ctx.kernels.rms_norm if ctx.kernels else rms_norm)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable  # rstd is saved without a graph: no second derivative through this backward
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm weight (never the frozen base's)
            normed = (x.float() * rstd).to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            kernels = _usable(ctx.kernels)
            grad_x = (kernels.rms_norm_input_grad if kernels else rms_norm_input_grad)(grad, x, weight, rstd)
        return grad_x, grad_weight, None, None


def _swiglu_forward(self: nn.Module, x: torch.Tensor, kernels: Kernels | None = None) -> torch.Tensor:
    # Compiled loops in training steps only: evaluation and decoding keep the eager numbers.
    kernels = kernels if torch.is_grad_enabled() else None
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x), kernels))


def use_fused_mlp(model: nn.Module, kernels: Kernels | None = None) -> int:
    """Give every plain SwiGLU MLP (`PLAIN_SWIGLU_MLPS` with a SiLU activation) the fused forward,
    with `kernels`' compiled loops if given. Other MLPs are left as they are. Returns how many were
    changed."""
    return _replace_forward(model, PLAIN_SWIGLU_MLPS, _swiglu_forward,
                            lambda module: _is_silu(getattr(module, "act_fn", None)), kernels)


def _rms_norm_forward(self: nn.Module, x: torch.Tensor, kernels: Kernels | None = None) -> torch.Tensor:
    kernels = kernels if torch.is_grad_enabled() else None  # as in _swiglu_forward
    return RMSNormFunction.apply(x, self.weight, self.variance_epsilon, kernels)


def use_fused_norm(model: nn.Module, kernels: Kernels | None = None) -> int:
    """Give every `PLAIN_RMSNORMS` module the one-op forward, with `kernels`' compiled loops if given.
    Returns how many were changed."""
    return _replace_forward(model, PLAIN_RMSNORMS, _rms_norm_forward,
                            lambda module: hasattr(module, "variance_epsilon"), kernels)


def _replace_forward(model: nn.Module, names: tuple[str, ...], forward: Callable,
                     applies: Callable[[nn.Module], bool], kernels: Kernels | None = None) -> int:
    """Bind `forward` to every module of `model` whose class is transformers' own (not a same-named
    one from a model's remote code), named in `names`, and for which `applies(module)`."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in names and cls.__module__.startswith("transformers.models.") and applies(module):
            bound = functools.partial(forward, module)  # a bound method would not pickle
            module.forward = functools.partial(bound, kernels=kernels) if kernels else bound
            changed += 1
    return changed


def _is_silu(activation: nn.Module | None) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation (F.silu), or torch's nn.SiLU.
    return isinstance(activation, nn.SiLU) or type(activation).__name__ == "SiLUActivation"
