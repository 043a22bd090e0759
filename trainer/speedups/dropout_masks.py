"""LoRA's input dropout with cheaper masks, for training: `use_dropout_masks(model)`.

`LoRALinear` runs `nn.Dropout` on the adapter's input: one random float per element, and A's weight
gradient keeps the dropped-out copy of x. Here a mask takes one random byte per element, and 16 more
bits only for the 1 in 256 elements whose byte falls on the drop probability's boundary (the
probability is rounded to 1/2^24); A's product keeps x and the boolean mask instead of a masked copy,
so q, k and v, which read the same x, hold it once. Inverted dropout's 1 / keep-probability is folded
into the adapter's scaling. The same distribution as `nn.Dropout`, other random numbers: switching it
on changes a run's values, not what they estimate. Evaluation (`eval()`) runs `LoRALinear`'s own forward.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.adapters import lora_layers
from trainer.model.lora import LoRALinear

# One random byte per element, and 16 more bits on the boundary: the probability is rounded to 1/2^24.
MASK_BITS = 24


def use_dropout_masks(model: nn.Module) -> int:
    """Give every `LoRALinear` of `model` with dropout (p > 0) the masked forward. Returns how many
    were changed."""
    changed = 0
    for layer in lora_layers(model).values():
        if isinstance(layer, LoRALinear) and isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p > 0:
            # functools.partial, not a bound method: the model must still pickle.
            layer.forward = functools.partial(_masked_forward, layer)
            layer.lora_A.forward = functools.partial(_masked_down, layer.lora_A)
            changed += 1
    return changed


def _masked_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.merged:
        return LoRALinear.forward(self, x)
    result = self.base_layer(x)
    x = x.to(self.lora_A.weight.dtype)
    keep, keep_probability = dropout_keep_mask(x, self.lora_dropout.p)
    # Inverted dropout, its 1 / keep-probability folded into the scaling.
    return self.add_update(result, self.lora_A(x, keep), self.scaling / keep_probability)


def _masked_down(self: nn.Linear, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """lora_A's forward with dropout given as a keep mask. Called through the module, so ZeRO-3
    gathers A around it."""
    if keep is None:
        return F.linear(x, self.weight)
    return MaskedLinear.apply(x, keep, self.weight)


class MaskedLinear(torch.autograd.Function):
    """(x * keep) @ W^T for a boolean keep mask. Saves x and the mask, not the masked copy of x: q, k
    and v read the same x, so it is held once (when base and adapters share a dtype; otherwise each
    adapter converts x, and keeps its own copy). The mask is widened to x's dtype through uint8 before
    multiplying: multiplying by a bool tensor, or `where` on it, takes a type-promoting path several
    times slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, keep, weight)
        return F.linear(x * _widened(keep, x.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        x, keep, weight = ctx.saved_tensors
        mask = _widened(keep, x.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).mul_(mask)
        if ctx.needs_input_grad[2]:
            kept = x * mask
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])
        return grad_x, None, grad_weight


def _widened(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return keep.view(torch.uint8).to(dtype)


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask shaped like x, True with probability 1 - p (p rounded to 1/2^24), from
    torch's generator; and that keep probability.

    With p * 2^24 = boundary * 2^16 + rest, an element is dropped when its random byte is below
    `boundary`, or equal to it and 16 further random bits are below `rest`. On CPU the comparisons
    run in numpy, which does them about ten times faster than torch does on one thread."""
    dropped = round(p * 2**MASK_BITS)  # p <= 0.99 (the recipe's limit): boundary stays below 256
    boundary, rest = divmod(dropped, 2**16)
    levels = _random(x.numel(), torch.uint8, x.device)
    keep = (_keep_in_numpy if x.device.type == "cpu" else _keep_in_torch)(levels, boundary, rest)
    return keep.view(x.shape), 1 - dropped / 2**MASK_BITS


def _keep_in_numpy(levels: torch.Tensor, boundary: int, rest: int) -> torch.Tensor:
    byte = levels.numpy()
    keep = byte >= boundary
    ties = np.flatnonzero(byte == boundary) if rest else ()
    if len(ties):  # the 16 further bits come as int16: at or above rest - 2^15 is at or above `rest`
        keep[ties] = _random(len(ties), torch.int16, levels.device).numpy() >= rest - 2**15
    return torch.from_numpy(keep)


def _keep_in_torch(levels: torch.Tensor, boundary: int, rest: int) -> torch.Tensor:
    keep = levels >= boundary
    if rest:
        keep &= (levels != boundary) | (_random(levels.numel(), torch.int16, levels.device) >= rest - 2**15)
    return keep


def _random(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`count` uniform integers of `dtype` (uint8 or int16) from torch's generator, several per
    64-bit draw."""
    per_word = 8 // dtype.itemsize
    words = torch.empty((count + per_word - 1) // per_word, dtype=torch.int64, device=device)
    return words.random_(-2**63, 2**63 - 1).view(dtype)[:count]
