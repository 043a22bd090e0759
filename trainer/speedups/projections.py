"""q, k and v as one product, for training on the CPU: `project(attention, names, x)`.

An attention layer's q, k and v projections read the same input. Each is a frozen base layer (routed
by trainer/speedups/onednn.py: decode the 4-bit weight, multiply) with, usually, a LoRA adapter. One
by one, k's and v's narrow products (576 -> 192 on SmolLM2) run below the rate of a wide one, each
adapter's A reads x again, and the backward adds six input gradients (three frozen layers', three
adapters') into one, a pass over [tokens x hidden] for each. `SharedInputLinear` multiplies x once
by the weights stacked ([W_q; W_k; W_v], each decoded as its own layer decodes it) and once by the
adapters' A stacked, adds each adapter's B h into its slice of the result (addmm, as `LoRALinear`
does); its backward takes the input's gradient in one product with the stacked weight, and adds the
adapters' share inside one more (addmm: no separate pass). The weight gradients of A and B are the
layers' own formulas. Same arithmetic as the layers one by one, summed in another order: equal up to
float rounding.

It applies in training steps (gradients on), where every layer is a frozen layer that onednn.py
routes for this input, or a `LoRALinear` over one (unmerged, without dropout or DoRA, its adapters in
x's dtype and not partitioned by ZeRO-3), all with one product and dtype, and no module hooks on
them. Anywhere else (evaluation and decoding, GPU, ZeRO-3, LoRA dropout) each layer runs its own
forward. `train.fused_qkv=false` turns it off.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.profiler import record_function

from trainer.model.lora import LoRALinear
from trainer.speedups import onednn

# Ranges the profiler sees (launch/benchmarks/profile.py gives their time to the frozen linears and
# to LoRA).
FROZEN_RANGE = "shared input: frozen product"
ADAPTER_RANGE = "shared input: adapter products"
# An attention layer's projections of its input.
QKV = ("q_proj", "k_proj", "v_proj")


class Adapter(NamedTuple):
    """A LoRA adapter's place in the stacked product: its output columns, its rank rows, its scaling."""
    columns: slice
    ranks: slice
    scaling: float


class Plan(NamedTuple):
    routes: list[onednn.Route]
    sizes: list[int]  # each layer's output width
    adapters: list[Adapter]
    parameters: list[torch.Tensor]  # A, B of each adapter, in order

    def weight(self) -> torch.Tensor:
        return torch.cat([route.weight_of() for route in self.routes])

    def bias(self) -> torch.Tensor | None:
        return None if self.routes[0].bias is None else torch.cat([route.bias for route in self.routes])


def fused_attentions(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose forward (bound with `fused_qkv=True`) runs their q, k and v through
    `SharedInputLinear`, as far as can be told without an input (a call with too few rows still runs
    them one by one)."""
    found = []
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if (isinstance(forward, functools.partial) and forward.keywords.get("fused_qkv")
                and _fusable_together([getattr(module, name) for name in QKV])):
            found.append(module)
    return found


def fused_layers(model: nn.Module) -> set[nn.Module]:
    """The modules that run inside `SharedInputLinear` rather than being called: the q, k and v layers
    of `fused_attentions(model)`, and their parts."""
    return {part for module in fused_attentions(model) for name in QKV for part in getattr(module, name).modules()}


def project(module: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """`[getattr(module, name)(x) for name in names]`, through `SharedInputLinear` where it applies."""
    layers = [getattr(module, name) for name in names]
    plan = plan_for(layers, x) if torch.is_grad_enabled() else None
    if plan is None:
        return [layer(x) for layer in layers]
    return list(SharedInputLinear.apply(x, plan, *plan.parameters).split(plan.sizes, -1))


def plan_for(layers: Sequence[nn.Module], x: torch.Tensor) -> Plan | None:
    """How `SharedInputLinear` computes `layers` on x; None where it does not apply (see the module's
    docstring)."""
    if not _fusable_together(layers):
        return None
    routes, sizes, adapters, parameters = [], [], [], []
    rank = 0
    for layer in layers:
        base = _base(layer)
        route = onednn.route(base, x)
        if route is None:
            return None
        if base is not layer:
            if any(p.dtype != x.dtype for p in (layer.lora_A.weight, layer.lora_B.weight)):
                return None
            start = sum(sizes)
            adapters.append(Adapter(slice(start, start + base.out_features), slice(rank, rank + layer.r),
                                    layer.scaling))
            parameters += [layer.lora_A.weight, layer.lora_B.weight]
            rank += layer.r
        routes.append(route)
        sizes.append(base.out_features)
    if len({(route.library, route.dtype) for route in routes}) > 1:
        return None
    return Plan(routes, sizes, adapters, parameters)


def _fusable_together(layers: Sequence[nn.Module]) -> bool:
    """`_fusable` layers, two or more, all with a bias or none, and no global module hooks."""
    return (len(layers) >= 2 and not _global_hooks() and all(_fusable(layer) for layer in layers)
            and len({_base(layer).bias is None for layer in layers}) == 1)


def _base(layer: nn.Module) -> nn.Module:
    """The frozen layer itself, or the one a `LoRALinear` wraps."""
    return layer.base_layer if type(layer) is LoRALinear else layer


def _fusable(layer: nn.Module) -> bool:
    """What can be told of a layer without an input: a layer routed by onednn.py, or a `LoRALinear`
    over one computing W x + scaling * B A x exactly (no dropout, no DoRA, not merged, no forward of
    its own, adapters all here: not ZeRO-3 placeholders), with no module hooks on any of it (a hook
    expects its module to be called)."""
    if type(layer) is not LoRALinear:
        return onednn.routed(layer) and not _hooked(layer)
    return (onednn.routed(layer.base_layer) and not layer.merged and layer.lora_magnitude_vector is None
            and isinstance(layer.lora_dropout, nn.Identity) and "forward" not in layer.__dict__
            and not any(_hooked(m) for m in layer.modules())
            and not any(hasattr(m.weight, "ds_id") for m in (layer.lora_A, layer.lora_B)))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)


class SharedInputLinear(torch.autograd.Function):
    """[layer(x) for each layer of `plan`], concatenated on the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: Plan, *parameters: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        product = plan.routes[0].product
        with record_function(FROZEN_RANGE):
            out = product(rows, plan.weight(), plan.bias())
        hidden = None
        if plan.adapters:
            with record_function(ADAPTER_RANGE):
                hidden = rows @ torch.cat(parameters[0::2]).t()
                for adapter, up in zip(plan.adapters, parameters[1::2]):
                    # LoRALinear's own update: base + scaling * (h @ B^T), in one addmm.
                    out[:, adapter.columns].addmm_(hidden[:, adapter.ranks], up.t(), alpha=adapter.scaling)
        ctx.plan, ctx.shape = plan, x.shape
        # x for A's gradient, h for B's: kept only where they will be needed (frozen layers alone keep nothing).
        wants = ctx.needs_input_grad[2:]
        ctx.save_for_backward(rows if any(wants[0::2]) else None, hidden if any(wants[1::2]) else None, *parameters)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, hidden, *parameters = ctx.saved_tensors
        plan: Plan = ctx.plan
        grad = grad.reshape(-1, grad.shape[-1])
        wants_x, wants = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(parameters)
        grad_x = None
        if wants_x:
            with record_function(FROZEN_RANGE):
                grad_x = plan.routes[0].product(grad, plan.weight().t(), None)
        if plan.adapters and (wants_x or any(wants)):
            with record_function(ADAPTER_RANGE):
                grad_hidden = []
                for i, (adapter, up) in enumerate(zip(plan.adapters, parameters[1::2])):
                    part = grad[:, adapter.columns]
                    if wants[2 * i + 1]:
                        grads[2 * i + 1] = (part.t() @ hidden[:, adapter.ranks]).mul_(adapter.scaling)
                    grad_hidden.append((part @ up).mul_(adapter.scaling))
                grad_hidden = torch.cat(grad_hidden, 1)
                if any(wants[0::2]):
                    grad_down = grad_hidden.t() @ rows
                    for i, adapter in enumerate(plan.adapters):
                        if wants[2 * i]:
                            grads[2 * i] = grad_down[adapter.ranks]
                if grad_x is not None:
                    grad_x.addmm_(grad_hidden, torch.cat(parameters[0::2]))
        return None if grad_x is None else grad_x.view(ctx.shape), None, *grads
