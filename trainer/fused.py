"""A leaner SwiGLU MLP for training: silu(gate) * up as one autograd operation.

transformers' Llama-family MLP computes down(act(gate(x)) * up(x)), and autograd then keeps three
[tokens x intermediate] tensors for the backward: gate(x), act(gate(x)) and up(x). `SiluMul` keeps
gate(x) and up(x) and recomputes the SiLU in the backward (one elementwise pass), so each layer
holds one intermediate-sized activation less. The result and the gradients are the same numbers:
the backward runs the same kernels autograd would.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)). Matching by class, not by
# attribute names: other MLPs with the same parts also scale or clamp (Falcon-H1, DeepSeek-V4, ...).
PLAIN_SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP")


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


def _is_silu(activation: nn.Module | None) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation (F.silu), or torch's nn.SiLU.
    return isinstance(activation, nn.SiLU) or type(activation).__name__ == "SiLUActivation"
