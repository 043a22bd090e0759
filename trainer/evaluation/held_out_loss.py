"""Held-out loss: sum of token losses / number of response tokens, reduced across ranks, so the
number is the same whatever the world size or micro-batch size."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.runtime import distributed
from trainer.data.examples import Example
from trainer.data.batching import collate


@torch.no_grad()
def evaluate_loss(loss_model: nn.Module, examples: list[Example], micro_batch: int, pad_token_id: int,
                  device: torch.device) -> dict[str, float]:
    was_training = loss_model.training
    loss_model.eval()
    mine = examples[distributed.rank()::distributed.world_size()]
    loss_sum, tokens = 0.0, 0
    # Every rank runs the same number of forward passes: ZeRO-3 gathers parameters collectively.
    n_batches = math.ceil(math.ceil(len(examples) / distributed.world_size()) / micro_batch)
    for index in range(n_batches):
        batch = mine[index * micro_batch:(index + 1) * micro_batch] or examples[:1]
        inputs = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
        batch_loss, batch_tokens = loss_model(**inputs)
        if mine[index * micro_batch:(index + 1) * micro_batch]:
            loss_sum += batch_loss.item()
            tokens += int(batch_tokens)
    loss_model.train(was_training)
    loss_sum, tokens = distributed.sum_across_ranks([loss_sum, tokens], device)
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
