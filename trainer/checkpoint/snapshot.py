"""An in-memory checkpoint of one step: the adapter and its Adam state before the step, so a
non-finite update can be undone (train.on_nonfinite=skip)."""
from __future__ import annotations

import torch
from torch import nn

from trainer.checkpoint.resume import apply_training_state
from trainer.checkpoint.saving import gather_adapter, gather_optimizer_state


class UpdateSnapshot:
    """The adapter's fp32 weights and Adam state before a step. It costs a gather of the (small)
    adapter state per step, so it is taken only with on_nonfinite=skip."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, engine_optimizer):
        self.model, self.optimizer, self.engine_optimizer = model, optimizer, engine_optimizer
        self.weights = gather_adapter(model)
        self.moments, self.adam_step = gather_optimizer_state(model, optimizer)

    def restore(self) -> None:
        apply_training_state(self.model, self.optimizer, self.engine_optimizer, self.weights,
                             self.moments, self.adam_step)
