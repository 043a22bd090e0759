"""The training objective: next-token cross-entropy on trained (label != -100) positions only.

Hidden states of the trained positions are picked out before the vocabulary projection. When
their logits would be large (a 32k vocabulary, thousands of tokens), the projection +
cross-entropy run in chunks under activation checkpointing, so the full [tokens x vocab] fp32
logits tensor is never held at once; small logits are computed in one go and kept for the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer import packing
from trainer.data import IGNORE_INDEX


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; forward returns (sum of token losses, number of trained tokens).

    Takes `trainer.data.collate`'s batch, or `trainer.packing.collate_packed`'s: a [rows, 1, L, L]
    boolean mask, per-example `position_ids`, and `segment_lengths`."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, segment_lengths: torch.Tensor | None = None,
                **_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.model.config._attn_implementation
        if segment_lengths is not None and attention == packing.PACKED_ATTENTION:
            # Attention per example reads the examples from position_ids: no mask, no padding.
            input_ids, position_ids, labels = packing.unpad(segment_lengths, input_ids, position_ids, labels)
            attention_mask = None
        elif attention_mask.dim() == 4 and attention == "eager":
            # Eager attention adds the mask to the scores; SDPA takes the boolean mask as is.
            attention_mask = additive_mask(attention_mask, self.model.get_input_embeddings().weight.dtype)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        return chunked_cross_entropy(self.model.get_output_embeddings(), hidden[:, :-1][trained],
                                     targets[trained], self.chunk_tokens)


# Logits up to this many elements are kept rather than recomputed in chunks: 64 MiB in fp32, and
# about as much again for the log-softmax the backward keeps (plus the compute-dtype logits).
KEEP_LOGITS_UP_TO = 2**24


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                          keep_logits_up_to: int = KEEP_LOGITS_UP_TO) -> tuple[torch.Tensor, torch.Tensor]:
    count = torch.tensor(targets.numel(), device=hidden.device)
    if hidden.shape[0] * head.out_features <= keep_logits_up_to:
        return _chunk_loss(head, hidden, targets), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and chunk.requires_grad:
            total = total + checkpoint(_chunk_loss, head, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, chunk, chunk_targets)
    return total, count


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> 0 where attended, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations.

    Non-reentrant: the frozen base's inputs never require grad, and reentrant checkpointing would
    then return no gradient for the adapters inside the layer (silently training nothing)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
