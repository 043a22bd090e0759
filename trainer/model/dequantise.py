"""A base layer's weight as floats, whatever its storage: a bitsandbytes `Linear4bit` or `Linear8bitLt`
decoded, a plain `nn.Linear` as it is; and a quantised layer replaced by a plain frozen `nn.Linear`
(merging an adapter, export)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def is_quantised(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(layer).__name__ in ("Linear4bit", "Linear8bitLt")


def dequantised_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight as a float tensor, whatever its storage; in `dtype` if given (a 4-bit
    weight decoded straight into it: the same numbers as decoding to fp32 and rounding, in one pass)."""
    name = type(layer).__name__
    if name == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        state = layer.weight.quant_state
        if dtype is not None and dtype != state.dtype:
            state = copy.copy(state)  # bitsandbytes decodes into the state's dtype
            state.dtype = dtype
        return bnb_functional.dequantize_4bit(layer.weight.data, state)
    if name == "Linear8bitLt":
        import bitsandbytes.functional as bnb_functional

        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        weight = bnb_functional.int8_vectorwise_dequant(layer.weight.data, scales)
    else:
        weight = layer.weight.data
    return weight if dtype is None else weight.to(dtype)


def recorded_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of the model a quantised layer belongs to, where the layer records it: a 4-bit layer's
    own (not its compute dtype: under quant.compute_dtype=bfloat16 an fp32 model's layer is fp32)."""
    state = getattr(layer.weight, "quant_state", None)
    return getattr(state, "dtype", None) or getattr(layer, "compute_dtype", None)


def dequantised_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    weight = dequantised_weight(layer)
    dtype = dtype or recorded_dtype(layer) or torch.float32
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=dtype)
    linear.weight.data.copy_(weight.to(dtype))
    if layer.bias is not None:
        linear.bias.data.copy_(layer.bias.data.to(dtype))
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    return linear
