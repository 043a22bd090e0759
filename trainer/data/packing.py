"""Sequence packing: several examples share one row of at most `max_seq_len` tokens, with no
attention and no prediction across the examples in a row.

Each example keeps its own positions (0, 1, 2, ... from its first token) and attends only to
itself: `attention_mask` is a block-diagonal causal [rows, 1, L, L] boolean mask (True = attend),
which transformers passes to SDPA as is. The first label of every example is -100, so the last
token of one example is never trained to predict the first token of the next.

With `use_packed_attention(model)` the mask is not used: `CausalLMLoss` joins the rows end to end
without their padding (`unpad`) and attention runs per example: the examples' lengths come
from the collate's `segment_lengths`, read on the host (a caller without them: found where
`position_ids` restart, which makes the device wait on the host in every layer). Attention then
costs the sum of the examples' squared lengths under a causal kernel, instead of rows x L^2
through a mask (SDPA on CPU computes every masked-out block).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from trainer.runtime import distributed
from trainer.config import Recipe
from trainer.data.encoding import IGNORE_INDEX, Example
from trainer.data.batching import collate, token_tensor

PACKED_ATTENTION = "packed_sdpa"


def training_collate(recipe: Recipe, model: torch.nn.Module,
                     pad_token_id: int) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """The loop's micro-batch collate. With data.packing (the default): packed rows, and an SDPA model
    switched to packed attention; without, or with an attention that cannot isolate the examples
    of a row: `trainer.data.batching.collate` (one example per row, padded)."""
    if not recipe.data.packing:
        return lambda examples: collate(examples, pad_token_id)
    attention = model.config._attn_implementation
    if attention in ("sdpa", PACKED_ATTENTION):
        use_packed_attention(model)
        # Attention per example reads position_ids: the [rows, 1, L, L] mask would go unused.
        return lambda examples: collate_packed(examples, recipe.data.max_seq_len, pad_token_id, with_mask=False)
    if attention != "eager":  # eager takes the 4D mask (made additive by CausalLMLoss)
        if distributed.is_main():
            print(f"note: data.packing needs model.attn_implementation sdpa or eager, not {attention!r}; "
                  f"training with one example per row", flush=True)
        return lambda examples: collate(examples, pad_token_id)
    return lambda examples: collate_packed(examples, recipe.data.max_seq_len, pad_token_id)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples placed in each row, longest examples first.
    An example longer than `capacity` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def collate_packed(examples: list[Example], max_seq_len: int, pad_token_id: int,
                   with_mask: bool = True) -> dict[str, torch.Tensor]:
    """`trainer.data.batching.collate`'s keys for packed rows, plus `position_ids` and `segment_lengths`
    (`attention_mask` only `with_mask`: packed attention does not read it).

    input_ids, labels, position_ids: [rows, L], L the longest packed row (at most max_seq_len);
    attention_mask: [rows, 1, L, L] bool; segment_lengths: [rows, S], each row's example lengths,
    zero-filled; row_ids: the examples' row ids in packed order. A row's padding tail attends to
    itself only (positions from 0, labels -100): no query row of the mask is empty, and padding
    never reaches a real token."""
    rows = pack_rows([len(e.input_ids) for e in examples], max_seq_len)
    length = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segments: list[list[int]] = []
    for r, row in enumerate(rows):
        start, lengths = 0, []
        for segment, index in enumerate(row):
            example = examples[index]
            n = len(example.input_ids)
            input_ids[r, start:start + n] = token_tensor(example.input_ids)
            labels[r, start + 1:start + n] = token_tensor(example.labels[1:])
            position_ids[r, start:start + n] = torch.arange(n)
            segment_ids[r, start:start + n] = segment
            start += n
            lengths.append(n)
        position_ids[r, start:] = torch.arange(length - start)
        segment_ids[r, start:] = len(row)
        segments.append(lengths)
    segment_lengths = torch.zeros((len(rows), max(len(s) for s in segments)), dtype=torch.long)
    for r, lengths in enumerate(segments):
        segment_lengths[r, :len(lengths)] = torch.tensor(lengths)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "segment_lengths": segment_lengths,
             "row_ids": torch.tensor([examples[i].row_id for row in rows for i in row])}
    if with_mask:
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        batch["attention_mask"] = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    return batch


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to `packed_sdpa`: with no padding mask, attention runs per example, the
    examples found where `position_ids` restart (transformers' packed format, as its FlashAttention
    path reads it); with a mask, or with a KV cache, it is transformers' SDPA unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if model.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(f"packed attention replaces sdpa; this model uses {model.config._attn_implementation!r} "
                         f"(set model.attn_implementation=sdpa, or leave packed attention off)")
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _packed_sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)


def unpad(segment_lengths: list[list[int]], *rows: torch.Tensor) -> list[torch.Tensor]:
    """[rows, L] tensors -> [1, tokens]: the packed rows end to end, without their padding tails.
    With attention per example, the row layout no longer matters, and padding would cost compute.
    `segment_lengths`: each row's example lengths (host integers, so slicing needs no device sync)."""
    kept = [sum(lengths) for lengths in segment_lengths]
    return [torch.cat([tensor[r, :n] for r, n in enumerate(kept)])[None] for tensor in rows]


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
    key, value = (repeat_kv(t, getattr(module, "num_key_value_groups", 1)) for t in (key, value))
    packed_lengths = kwargs.get("packed_lengths")
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
    rows = []
    for row, lengths in enumerate(per_row):
        # One row (always, after `unpad`): the tensors themselves, since a slice's backward would
        # zero-fill and copy each of q, k and v. Split, not slicing, per example: its backward is one
        # concatenation, not a zero-filled copy per example.
        row_tensors = (query, key, value) if len(per_row) == 1 else (t[row:row + 1] for t in (query, key, value))
        pieces = zip(*(t.split(lengths, dim=2) for t in row_tensors))
        # Each output goes to [1, length, heads, head_dim] as a view; one concatenation then writes
        # the row in the layout the output projection reads (no second, transposing copy).
        rows.append(torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                              scale=scaling).transpose(1, 2)
                               for q, k, v in pieces], dim=1))
    return torch.cat(rows) if len(rows) > 1 else rows[0], None
