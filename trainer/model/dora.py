"""DoRA's shared pieces: its weight norm reads whole weights, which ZeRO-3 keeps partitioned, and
its scale m / ||V|| is 0 on a zero row of V (an all-zero base row: a tied lm_head's padding row).

DoRA (Liu et al. 2024) writes the adapted weight as W' = m * V / ||V||, with V = W + scaling * B @ A,
the norm taken per output row and the magnitude m trained. The norm is computed from the
dequantised base weight without autograd (section 4.3 of the paper, and peft, treat it as a
constant in backward), so backward keeps no dequantised copy of W and memory stays that of LoRA.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def full_parameters(*modules: nn.Module) -> Iterator[None]:
    """The modules' own parameters whole while inside. Under ZeRO-3 they are partitioned outside
    the module's own forward; gathering is a collective, and every rank runs the same forward."""
    # Only the partitioned ones: a parameter already whole (its module is running, or it is small
    # enough for ZeRO-3 to keep it whole) must not be re-partitioned on the way out.
    parameters = [p for module in modules for p in module.parameters(recurse=False)
                  if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's m / ||V|| per row of V, and 0 where ||V|| = 0. That row of V is zero (a zero base row,
    e.g. a tied lm_head's padding row, with its row of B still zero), so any scale gives the same
    zero: 0 keeps 0/0 = NaN out of the output, and dividing by 1 there (masked) out of the gradient.
    Rows with a norm are divided as before, so their numbers are unchanged bit for bit (clamping
    the norm to finfo.tiny instead would change rows with a subnormal norm)."""
    nonzero = norm > 0
    return torch.where(nonzero, magnitude / torch.where(nonzero, norm, 1), 0)


def kept_for_unmerge(weight: torch.Tensor, factor: torch.Tensor,
                     dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The base weight's rows (dim=0) or columns (dim=1) whose DoRA factor is 0, for unmerge: merging
    writes 0 there whatever the base held (m = 0: a zero base row, its V then zero or not; or ||V|| =
    0: W = -dW), so dividing back cannot restore them and neither 0 nor -dW is right in both cases."""
    indices = (factor == 0).nonzero().flatten()
    if indices.numel() == 0:
        return None
    return indices, weight.detach().index_select(dim, indices).clone()
