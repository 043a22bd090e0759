"""Causal attention over packed examples on the CPU as blocks of products, softmax kept for the backward:
`attention(query, key, value, lengths, scaling)`, which packed attention (packed_attention.py) calls
where `applies(...)`.

torch's CPU flash kernel splits each example's queries into blocks of 32-64 rows, multiplies each
block by the keys up to it in small GEMMs, one head at a time, and recomputes the scores in the
backward. On instruction data (examples of ~175 tokens) that does ~35 GFLOP/s of useful work on one
thread of this machine's Xeon, where the frozen layers' products run at 150-220. Here, per example:
- the query heads that share a key/value head are stacked as the rows of one product (grouped-query
  attention without repeating K and V): [heads per group x positions, head_dim] by [head_dim, keys];
- the queries go in blocks of ~BLOCK positions, each multiplied by the keys up to its own end only:
  at 175 tokens about 2/3 of the full square's work, in products large enough to run well;
- the softmax is kept for the backward, which is then four products and one pass per block, with no
  recomputation. It costs ~0.6 x heads x length x 4 bytes per token and layer, hence examples up to
  KEEP_SCORES_UP_TO tokens (SmolLM2 at 175: ~4 KB per token and layer, where its MLP alone keeps 12).
One SmolLM2 layer, 8 examples of 110-240 tokens (9 query on 3 key/value heads of 64), fp32, forward and
backward, one thread: 22 against 27 ms through the flash kernel. The same attention, summed in another
order: equal to SDPA's to 1e-12 in float64 (tested).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

BLOCK = 64  # query positions per product (48, 64 and 96 measured alike on SmolLM2)
KEEP_SCORES_UP_TO = 512  # longest example whose softmax is kept; a longer one sends its batch to SDPA

_MASKS: dict[tuple[torch.dtype, int], torch.Tensor] = {}


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int], dropout: float) -> bool:
    """On the CPU, in fp32 (or float64), without attention dropout, for examples that make up the whole
    sequence, each short enough."""
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64) and not dropout
            and all(t.device == query.device and t.dtype == query.dtype and t.shape[-1] == query.shape[-1]
                    for t in (key, value))
            and query.shape[0] == 1 and query.shape[1] % key.shape[1] == 0 and key.shape[1] == value.shape[1]
            and key.shape[2] == value.shape[2] == query.shape[2] == sum(lengths)
            and max(lengths, default=0) <= KEEP_SCORES_UP_TO)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
              scaling: float) -> torch.Tensor:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] (any strides), T = sum(lengths),
    each example causal within itself -> [1, T, heads, head_dim]."""
    return BlockedCausalAttention.apply(query, key, value, lengths, scaling)


def _blocks(length: int) -> list[tuple[int, int]]:
    count = max(1, round(length / BLOCK))
    edges = [length * i // count for i in range(count + 1)]
    return list(zip(edges, edges[1:]))


def _causal_mask(dtype: torch.dtype, group: int) -> torch.Tensor:
    """[KEEP_SCORES_UP_TO x group, KEEP_SCORES_UP_TO]: row (position t, head j of a group) may see keys
    up to t (0), not after it (-inf)."""
    mask = _MASKS.get((dtype, group))
    if mask is None:
        positions = torch.arange(KEEP_SCORES_UP_TO)
        after = (positions[None, :] > positions[:, None])[:, None, :].expand(-1, group, -1)
        mask = torch.zeros(after.shape, dtype=dtype).masked_fill_(after, float("-inf"))
        mask = _MASKS[(dtype, group)] = mask.view(-1, KEEP_SCORES_UP_TO)
    return mask


def _grouped(rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[n, heads, D] -> [kv_heads, n x group, D]: each key/value head's query heads, position by position."""
    n, heads, dim = rows.shape
    return rows.reshape(n, kv_heads, heads // kv_heads, dim).transpose(0, 1).reshape(kv_heads, -1, dim)


def _ungroup_into(rows: torch.Tensor, grouped: torch.Tensor) -> None:
    """The inverse of `_grouped`, written into `rows` ([n, heads, D], contiguous)."""
    kv_heads, _, dim = grouped.shape
    rows.view(rows.shape[0], kv_heads, -1, dim).copy_(grouped.view(kv_heads, rows.shape[0], -1, dim).transpose(0, 1))


class BlockedCausalAttention(torch.autograd.Function):
    """softmax(scaling x Q K^T + causal mask) V per example, with the softmax kept for the backward."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                scaling: float) -> torch.Tensor:
        kv_heads = key.shape[1]
        group = query.shape[1] // kv_heads
        queries, keys, values = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
        out = query.new_empty(queries.shape)
        mask = _causal_mask(query.dtype, group)
        keep = any(ctx.needs_input_grad[:3])  # else (no gradient wanted) each softmax goes once used
        saved = []
        start = 0
        for n in lengths:
            grouped_query = _grouped(queries[start:start + n], kv_heads)  # [kv_heads, n x group, D]
            example_keys = keys[start:start + n].transpose(0, 1)  # [kv_heads, n, D], a view
            example_values = values[start:start + n].transpose(0, 1)
            if keep:
                saved.append(grouped_query)
            for first, end in _blocks(n):
                rows = slice(first * group, end * group)
                scores = torch.baddbmm(mask[rows, :end], grouped_query[:, rows], example_keys[:, :end].transpose(1, 2),
                                       alpha=scaling)
                probabilities = torch.softmax(scores, dim=-1)
                del scores
                _ungroup_into(out[start + first:start + end], torch.bmm(probabilities, example_values[:, :end]))
                if keep:
                    saved.append(probabilities)
            start += n
        ctx.save_for_backward(key, value, out, *saved)
        ctx.lengths, ctx.scaling = lengths, scaling
        return out[None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        key, value, out, *saved = ctx.saved_tensors
        scaling = ctx.scaling
        kv_heads = key.shape[1]
        group = out.shape[1] // kv_heads
        grad_rows = grad_out[0]  # [T, heads, D]
        keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)
        grad_query, grad_key, grad_value = (torch.empty_like(t) for t in (out, keys, values))
        start = 0
        pieces = iter(saved)
        for n in ctx.lengths:
            grouped_query = next(pieces)
            grouped_grad = _grouped(grad_rows[start:start + n], kv_heads)  # [kv_heads, n x group, D]
            # rowsum(dO * O), the softmax backward's correction, scaled as the scores were (per example: in cache)
            correction = (grad_rows[start:start + n] * out[start:start + n]).sum(-1, keepdim=True).mul_(scaling)
            grouped_correction = _grouped(correction, kv_heads)
            example_keys = keys[start:start + n].transpose(0, 1)
            example_values = values[start:start + n].transpose(0, 1)
            grad_example_keys = grad_example_values = None
            # Last block first: it reaches every key, so its products start the keys' and values' gradients
            # (contiguous, written by the product itself); each earlier block adds to a prefix of them.
            blocks = _blocks(n)
            kept = [next(pieces) for _ in blocks]
            for (first, end), probabilities in zip(reversed(blocks), reversed(kept)):
                rows = slice(first * group, end * group)
                block_grad = grouped_grad[:, rows]
                values_part = torch.bmm(probabilities.transpose(1, 2), block_grad)
                # the scores' gradient, scaled: P * scaling * (dO V^T - correction)
                grad_scores = torch.baddbmm(grouped_correction[:, rows], block_grad,
                                            example_values[:, :end].transpose(1, 2), beta=-1, alpha=scaling)
                grad_scores.mul_(probabilities)
                _ungroup_into(grad_query[start + first:start + end], torch.bmm(grad_scores, example_keys[:, :end]))
                keys_part = torch.bmm(grad_scores.transpose(1, 2), grouped_query[:, rows])
                if grad_example_keys is None:
                    grad_example_keys, grad_example_values = keys_part, values_part
                else:
                    grad_example_keys[:, :end] += keys_part
                    grad_example_values[:, :end] += values_part
            grad_key[start:start + n].copy_(grad_example_keys.transpose(0, 1))
            grad_value[start:start + n].copy_(grad_example_values.transpose(0, 1))
            start += n
        wanted = ctx.needs_input_grad
        return (grad_query.transpose(0, 1)[None] if wanted[0] else None,
                grad_key.transpose(0, 1)[None] if wanted[1] else None,
                grad_value.transpose(0, 1)[None] if wanted[2] else None, None, None)
