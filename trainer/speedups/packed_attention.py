"""Attention per packed example (`packed_sdpa`), for an SDPA model trained on packed rows:
`use_packed_attention(model)`.

With it, `CausalLMLoss` joins the packed rows end to end without their padding
(`trainer.data.packing.unpad`), and attention runs per example: the examples' lengths come from the
collate's `segment_lengths`, read on the host (a caller without them: found where `position_ids`
restart, which makes the device wait on the host in every layer). Attention then costs the sum of
the examples' squared lengths under a causal kernel, instead of rows x L^2 through the packed rows'
block-diagonal mask (SDPA on CPU computes every masked-out block). With a mask (padded batches), or
with a KV cache (decoding), it is transformers' SDPA unchanged. `blocked=True` (CPU training,
`train.blocked_attention`): where trainer/speedups/blocked_attention.py applies (fp32, examples up to
512 tokens), the examples go through its blocks of products instead of SDPA's flash kernel. On a
GPU in fp16/bf16 they go through one variable-length flash attention call (varlen_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import PACKED_ATTENTION  # noqa: F401  (one name: the recipe check refuses it as a setting)
from trainer.speedups import blocked_attention, varlen_attention


def use_packed_attention(model: torch.nn.Module, blocked: bool = False) -> None:
    """Switch an SDPA model to `packed_sdpa`: with no padding mask, attention runs per example, the
    examples found where `position_ids` restart (transformers' packed format, as its FlashAttention
    path reads it); with a mask, or with a KV cache, it is transformers' SDPA unchanged. `blocked`:
    the examples through blocked_attention.py where it applies (else SDPA's kernel)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if model.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(f"packed attention replaces sdpa; this model uses {model.config._attn_implementation!r} "
                         f"(set model.attn_implementation=sdpa, or leave packed attention off)")
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _packed_sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    for module in model.modules():  # the causal attention layers: what the attention function is called with
        if getattr(module, "is_causal", None) is True and hasattr(module, "scaling"):
            module.blocked_attention = blocked


def _packed_sdpa_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs["q_length"] == kwargs["kv_length"]:
        return None  # causal within each example: packed_sdpa_attention reads them from position_ids
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, heads, L, head_dim], key/value [B, kv_heads, L, head_dim] -> [B, L, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    length = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    packed_lengths = kwargs.get("packed_lengths")
    if (packed_lengths is not None and getattr(module, "blocked_attention", False)
            and kwargs.get("sliding_window") is None and kwargs.get("softcap") is None
            and blocked_attention.applies(query, key, value, packed_lengths, dropout)):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return blocked_attention.attention(query, key, value, packed_lengths, scaling), None
    if packed_lengths is not None and varlen_attention.applies(query, dropout, kwargs.get("softcap")):
        output = varlen_attention.attention(query, key, value, packed_lengths, scaling, kwargs.get("sliding_window"))
        if output is not None:
            return output, None
    # Grouped-query attention (fewer key/value heads than query heads) in the kernel itself: torch's
    # CPU flash kernel reads each key/value head for its group of query heads. Repeating K and V to
    # every query head first (transformers' repeat_kv) copies them, and their gradients are summed back
    # over the group: 42 against 27 ms per SmolLM2 layer (9/3 heads, 8 examples, forward + backward).
    # CPU only: on CUDA only the flash kernel takes grouped heads (SDPA would fall back to its math
    # kernel wherever flash cannot run), not measured there: repeated, as transformers does.
    grouped = key.shape[1] != query.shape[1]
    if grouped and query.device.type != "cpu":
        key, value = (repeat_kv(t, query.shape[1] // key.shape[1]) for t in (key, value))
        grouped = False
    if packed_lengths is not None and query.shape[0] == 1:  # from CausalLMLoss: known on the host
        per_row = [packed_lengths]
    else:  # an example starts wherever the position does not follow the previous one (a device sync)
        position_ids = position_ids.expand(query.shape[0], -1)
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        per_row = []
        for row_starts in starts:
            bounds = row_starts.nonzero().flatten().tolist() + [length]
            per_row.append([end - start for start, end in zip(bounds, bounds[1:])])
    # A sliding-window layer (Mistral, Gemma 3's local layers) sees the last `window` positions only
    # (transformers' rule: key k for query q where q - window < k <= q): an example longer than the
    # window takes that mask, the others plain causal attention.
    window = kwargs.get("sliding_window")
    rows = []
    for row, lengths in enumerate(per_row):
        # One row (always, after `unpad`): the tensors themselves, since a slice's backward would
        # zero-fill and copy each of q, k and v. Split, not slicing, per example: its backward is one
        # concatenation, not a zero-filled copy per example.
        row_tensors = (query, key, value) if len(per_row) == 1 else (t[row:row + 1] for t in (query, key, value))
        pieces = zip(*(t.split(lengths, dim=2) for t in row_tensors))
        # Each output goes to [1, length, heads, head_dim] as a view; one concatenation then writes
        # the row in the layout the output projection reads (no second, transposing copy).
        rows.append(torch.cat([_causal_sdpa(q, k, v, dropout, scaling, grouped, window).transpose(1, 2)
                               for q, k, v in pieces], dim=1))
    return torch.cat(rows) if len(rows) > 1 else rows[0], None


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None,
                 grouped: bool, window: int | None) -> torch.Tensor:
    """One example's causal attention, within the last `window` positions where it is longer than that."""
    length = query.shape[2]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=grouped)
    positions = torch.arange(length, device=query.device)
    behind = positions[:, None] - positions[None, :]  # query position - key position
    mask = (behind >= 0) & (behind < window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=grouped)
