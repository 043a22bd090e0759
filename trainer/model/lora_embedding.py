"""LoRA on a token embedding (`embed_tokens` in lora.target_modules), as loralib and peft have it:
y = E[x] + scaling * A^T[x] @ B^T, with A [r, vocab] starting at zero and B [dim, r] normal. (A
linear layer's A is the random one; here A is a lookup table, one column per token, and starts
at zero so the model starts at the base.) No dropout: peft applies none to embeddings either.

Tied input/output embeddings (SmolLM2): the adapter changes the vectors the model *reads* for
each token; the output projection (lm_head) keeps the base weight. That is peft's meaning too
(LoraConfig's default ensure_weight_tying=False), so peft loads our adapter with equal logits.
Merging therefore unties the two: the merged embedding is a new tensor, lm_head keeps the old
one, and an export saves both (tie_word_embeddings=false), see trainer/evaluation/export.py.

A scaled embedding (Gemma's `*TextScaledWordEmbedding`: E[x] * embed_scale, embed_scale = sqrt(dim))
scales the update too, y = (E[x] + scaling * A^T[x] @ B^T) * embed_scale, so the adapter is an update
of the table E: what merge() folds into it, an export writes and peft computes.

With DoRA the magnitude runs over the embedding dimension (peft's layout): row d of
V = W^T + scaling * B @ A [dim, vocab] is rescaled to magnitude m_d, its norm over the vocabulary
treated as a constant in backward. The norm is the table's, before any embed_scale (as in peft, and
as the merged table's forward applies it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.dora import dora_scale, full_parameters, kept_for_unmerge


class LoRAEmbedding(nn.Module):
    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, rslora: bool = False, dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, device=device, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=torch.float32))
        nn.init.normal_(self.lora_embedding_B)
        self.register_parameter("lora_magnitude_vector", None)
        if dora:  # A = 0: m = ||W^T||_row makes the layer start exactly at the base
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.merged = False
        self._merged_norm: torch.Tensor | None = None
        self._merged_kept: tuple[torch.Tensor, torch.Tensor] | None = None  # see merge()

    # The wrapped embedding's attributes, for code that reads them from get_input_embeddings().
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def embed_scale(self) -> torch.Tensor | float | None:
        """What the wrapped embedding multiplies its lookups by (Gemma's: a 0-d buffer, taken in the
        weight's dtype as its forward takes it; some others keep a float), None for a plain nn.Embedding."""
        scale = getattr(self.base_layer, "embed_scale", None)
        return scale.to(self.base_layer.weight.dtype) if isinstance(scale, torch.Tensor) else scale

    def delta_weight(self) -> torch.Tensor:
        """scaling * (B @ A)^T, shaped like the embedding weight [vocab, dim]."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W^T + scaling * B @ A|| per embedding dimension, in float32, outside autograd."""
        with full_parameters(self.base_layer, self):
            update = self.lora_embedding_B.float() @ self.lora_embedding_A.float()
            weight = self.base_layer.weight.float().t() + self.scaling * update
        return torch.linalg.vector_norm(weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq)
        update = (after_a @ self.lora_embedding_B.t()) * self.scaling
        embed_scale = self.embed_scale()
        if embed_scale is not None:  # the base scaled its lookup: (E + dE)[x] * s, as once merged
            update = update * embed_scale
        if self.lora_magnitude_vector is None:
            return result + update.to(result.dtype)
        scale = dora_scale(self.lora_magnitude_vector, self.weight_norm().to(update.dtype))
        return (scale * (result.to(update.dtype) + update)).to(result.dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> None:
        """Fold the update into a *new* weight tensor, so an output projection tied to the old one
        keeps the base weight (as it did in training). Merged in float32, then rounded once into the
        weight's own dtype. `dtype` is LoRALinear.merge's (`merge_all` passes every adapter the model's):
        it goes to a quantised layer that records no dtype of its own, and an embedding is never
        quantised, so here it is never needed."""
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight().float()
        if self.lora_magnitude_vector is not None:
            self._merged_norm = self.weight_norm()
            factor = dora_scale(self.lora_magnitude_vector.float(), self._merged_norm)
            self._merged_kept = kept_for_unmerge(weight, factor, dim=1)
            merged *= factor[None, :]
        self.base_layer.weight = nn.Parameter(merged.to(weight.dtype), requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        restored = weight.float()
        if self.lora_magnitude_vector is not None:
            factor = dora_scale(self.lora_magnitude_vector.float(), self._merged_norm)
            restored = restored / torch.where(factor != 0, factor, 1)[None, :]
        restored = restored - self.delta_weight().float()
        if self._merged_kept is not None:
            columns, values = self._merged_kept
            restored[:, columns] = values.float()
            self._merged_kept = None
        weight.data = restored.to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"dora={self.lora_magnitude_vector is not None}, merged={self.merged}")
