"""Sequence packing: several examples share one row of at most `max_seq_len` tokens, with no
attention and no prediction across the examples in a row.

Each example keeps its own positions (0, 1, 2, ... from its first token) and attends only to
itself: `attention_mask` is a block-diagonal causal [rows, 1, L, L] boolean mask (True = attend),
which transformers passes to SDPA as is. The first label of every example is -100, so the last
token of one example is never trained to predict the first token of the next.

Under packed attention (trainer/speedups/packed_attention.py) the mask is not made: `CausalLMLoss`
joins the rows end to end without their padding (`unpad`), and attention runs per example, from
`position_ids` and the collate's `segment_lengths`.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.runtime import distributed
from trainer.config import Recipe
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.batching import collate, token_tensor
from trainer.speedups.packed_attention import PACKED_ATTENTION


def training_collate(recipe: Recipe, model: torch.nn.Module,
                     pad_token_id: int) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """The loop's micro-batch collate, for the attention the model runs (`trainer.speedups.apply`
    switches an SDPA model to packed attention when data.packing). With data.packing (the default):
    packed rows, without their [rows, 1, L, L] mask under packed attention, which does not read it;
    without data.packing, or with an attention that cannot isolate the examples of a row:
    `trainer.data.batching.collate` (one example per row, padded)."""
    if not recipe.data.packing:
        return lambda examples: collate(examples, pad_token_id)
    attention = model.config._attn_implementation
    if attention == PACKED_ATTENTION:
        return lambda examples: collate_packed(examples, recipe.data.max_seq_len, pad_token_id, with_mask=False)
    if attention not in ("sdpa", "eager"):  # SDPA takes the 4D mask as is; eager, made additive by CausalLMLoss
        if distributed.is_main():
            print(f"note: data.packing needs model.attn_implementation sdpa or eager, not {attention!r}; "
                  f"training with one example per row", flush=True)
        return lambda examples: collate(examples, pad_token_id)
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < recipe.data.max_seq_len:
        # A packed row's 4D mask is one for all layers: it cannot hold the window of sliding-window
        # layers (nor tell them from global ones, as in Gemma 3); transformers builds both from a padding mask.
        if distributed.is_main():
            print(f"note: data.packing with {attention} attention cannot keep the model's sliding window "
                  f"({window} tokens, under data.max_seq_len {recipe.data.max_seq_len}); training with one "
                  f"example per row (model.attn_implementation=sdpa packs and keeps it)", flush=True)
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


def unpad(segment_lengths: list[list[int]], *rows: torch.Tensor) -> list[torch.Tensor]:
    """[rows, L] tensors -> [1, tokens]: the packed rows end to end, without their padding tails.
    With attention per example, the row layout no longer matters, and padding would cost compute.
    `segment_lengths`: each row's example lengths (host integers, so slicing needs no device sync)."""
    kept = [sum(lengths) for lengths in segment_lengths]
    return [torch.cat([tensor[r, :n] for r, n in enumerate(kept)])[None] for tensor in rows]
