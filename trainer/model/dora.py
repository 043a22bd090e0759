"""DoRA's shared piece: its weight norm reads whole weights, which ZeRO-3 keeps partitioned.

DoRA (Liu et al. 2024) writes the adapted weight as W' = m * V / ||V||, with V = W + scaling * B @ A,
the norm taken per output row and the magnitude m trained. The norm is computed from the
dequantised base weight without autograd (section 4.3 of the paper, and peft, treat it as a
constant in backward), so backward keeps no dequantised copy of W and memory stays that of LoRA.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
