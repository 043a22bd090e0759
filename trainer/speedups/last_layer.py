"""The last decoder layer's attention output projection and MLP on the trained positions only,
inside `CausalLMLoss`: `attach(model)`.

Both are per position, and after the last layer a position's hidden state feeds only its own
logits, so at positions the loss does not read their output is left out (zero) instead of
computed: the same loss and gradients for less work (about half of each on instruction data,
where prompts are not trained). Attention itself still runs everywhere (its keys and values are
every position's).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn


def attach(model: nn.Module) -> bool:
    """Put the hooks on `model`'s last layer (once per model). False where there is no MLP there."""
    layer = _last_layer(model)
    if not isinstance(getattr(layer, "mlp", None), nn.Module):
        return False
    if not isinstance(getattr(layer, "_trained_positions_hooks", None), LastLayerAtTrainedPositions):
        output_projection = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        modules = [output_projection] if isinstance(output_projection, nn.Module) else []
        layer._trained_positions_hooks = LastLayerAtTrainedPositions(layer, modules + [layer.mlp])
    return True


def only(model: nn.Module, index: torch.Tensor, positions: tuple[int, int]) -> AbstractContextManager:
    """Inside: `model`'s last layer runs on `index` only, if `attach` put the hooks there (else a
    no-op). index: the trained positions in the flattened [rows x L], `positions` = (rows, L)."""
    hooks = getattr(_last_layer(model), "_trained_positions_hooks", None)
    return hooks.only(index, positions) if hooks is not None else nullcontext()


def _last_layer(model: nn.Module) -> nn.Module | None:
    layers = getattr(model.get_decoder(), "layers", None)
    return layers[-1] if layers else None


class LastLayerAtTrainedPositions:
    """Pre- and post-hooks on the last layer's `modules` that gather the trained positions before
    each and scatter its output back (zeros elsewhere). Active only inside `only(...)`, i.e. inside
    `CausalLMLoss`; any other call (generation) runs the layer as it is. Off under activation
    checkpointing, whose recomputation in the backward would run outside `only`."""

    def __init__(self, layer: nn.Module, modules: list[nn.Module]):
        self.layer = layer
        self.index: torch.Tensor | None = None  # trained positions in the flattened [rows x L]
        self.positions: tuple[int, int] | None = None  # (rows, L)
        for module in modules:
            module.register_forward_pre_hook(self._gather)
            module.register_forward_hook(self._scatter)

    @contextmanager
    def only(self, index: torch.Tensor, positions: tuple[int, int]) -> Iterator[None]:
        """index: the trained positions in the flattened [rows x L] (`positions` = (rows, L)),
        those whose prediction of the next token is trained."""
        if not getattr(self.layer, "gradient_checkpointing", False) and index.numel():
            self.index, self.positions = index, positions
        try:
            yield
        finally:
            self.index = self.positions = None

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.index is None:
            return None
        x = args[0]
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.index)[None], *args[1:])

    def _scatter(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.index is None:
            return None
        rows = output.reshape(-1, output.shape[-1])
        full = rows.new_zeros((math.prod(self.positions), rows.shape[-1]))
        return full.index_copy(0, self.index, rows).view(*self.positions, rows.shape[-1])
