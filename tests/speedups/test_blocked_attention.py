"""trainer/speedups/blocked_attention.py: causal attention per packed example in blocks of queries
must be SDPA's attention, forward and backward, for every layout and length it takes, and only
where it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.speedups import blocked_attention
from trainer.speedups.blocked_attention import KEEP_SCORES_UP_TO, applies, attention

HEAD_DIM = 16


def reference(query, key, value, lengths, scaling):
    """SDPA per example (causal, grouped heads): [1, T, heads, head_dim]."""
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    return torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                     enable_gqa=True).transpose(1, 2) for q, k, v in pieces], dim=1)


def inputs(heads: int, kv_heads: int, lengths: list[int], layout: str, dtype=torch.float64):
    """q, k, v as [1, heads, T, head_dim]; "projected": views of [1, T, heads, head_dim] (as the rotary
    writes them), "contiguous": head-major memory."""
    generator = torch.Generator().manual_seed(sum(lengths) + heads)
    total = sum(lengths)

    def one(count):
        if layout == "projected":
            t = torch.randn(1, total, count, HEAD_DIM, dtype=dtype, generator=generator).transpose(1, 2)
        else:
            t = torch.randn(1, count, total, HEAD_DIM, dtype=dtype, generator=generator)
        return t.requires_grad_()

    return one(heads), one(kv_heads), one(kv_heads), torch.randn(1, total, heads, HEAD_DIM, dtype=dtype,
                                                                  generator=generator)


def forward_backward(function, query, key, value, grad, lengths, scaling):
    for t in (query, key, value):
        t.grad = None
    out = function(query, key, value, lengths, scaling)
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in (query, key, value)]


@pytest.mark.parametrize("heads, kv_heads, lengths, layout", [
    (9, 3, [185, 1, 2, 97, 64, 65, 33], "projected"),  # SmolLM2's groups; one- and two-token examples; block edges
    (4, 4, [5, 130], "contiguous"),  # no grouping
    (8, 2, [KEEP_SCORES_UP_TO], "projected"),  # the longest kept
    (6, 1, [96, 97, 160], "contiguous"),  # one key/value head for all
    (6, 1, [40, 150], "projected"),  # ... where the grouped queries are a view of the input, not a copy
])
def test_equals_sdpa_per_example_forward_and_backward(heads, kv_heads, lengths, layout):
    query, key, value, grad = inputs(heads, kv_heads, lengths, layout)
    expected = forward_backward(reference, query, key, value, grad, lengths, 0.3)
    got = forward_backward(attention, query, key, value, grad, lengths, 0.3)
    for name, a, b in zip(("output", "query grad", "key grad", "value grad"), got, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda message, name=name: f"{name}: {message}")
    assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0


def test_float32_is_sdpa_to_rounding_and_examples_do_not_see_each_other():
    lengths = [120, 70, 200]
    query, key, value, grad = (t.detach().float().requires_grad_() for t in inputs(9, 3, lengths, "projected"))
    expected = forward_backward(reference, query, key, value, grad, lengths, HEAD_DIM ** -0.5)
    got = forward_backward(attention, query, key, value, grad, lengths, HEAD_DIM ** -0.5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the first example's outputs do not depend on the later ones' keys or values
    with torch.no_grad():
        changed = value.clone()
        changed[:, :, lengths[0]:] += 1
        before = attention(query, key, value, lengths, 0.25)[:, :lengths[0]]
        assert torch.equal(attention(query, key, changed, lengths, 0.25)[:, :lengths[0]], before)


def test_inputs_that_need_no_gradient_get_none():
    query, key, value, grad = inputs(4, 2, [50, 80], "projected")
    key.requires_grad_(False)
    attention(query, key, value, [50, 80], 0.5).backward(grad)
    assert key.grad is None and query.grad is not None and value.grad is not None


def test_blocks_cover_every_position_once():
    for length in (1, 2, 63, 64, 95, 96, 97, 175, KEEP_SCORES_UP_TO):
        blocks = blocked_attention._blocks(length)
        assert blocks[0][0] == 0 and blocks[-1][1] == length
        assert all(end == next_first for (_, end), (next_first, _) in zip(blocks, blocks[1:]))
        assert all(end > first for first, end in blocks)
        assert max(end - first for first, end in blocks) <= 1.5 * blocked_attention.BLOCK


def test_applies_only_on_the_cpu_in_fp32_without_dropout_and_to_short_examples_making_up_the_sequence():
    def qkv(length, dtype=torch.float32, device="cpu"):
        return (torch.zeros(1, heads, length, HEAD_DIM, dtype=dtype, device=device) for heads in (9, 3, 3))

    assert applies(*qkv(10), [4, 6], 0.0)
    assert not applies(*qkv(10), [4, 6], 0.1)
    assert not applies(*qkv(10, torch.bfloat16), [4, 6], 0.0)
    assert not applies(*qkv(10, device="meta"), [4, 6], 0.0)
    assert not applies(*qkv(10), [4, 5], 0.0)  # the lengths must cover the sequence
    assert applies(*qkv(KEEP_SCORES_UP_TO), [KEEP_SCORES_UP_TO], 0.0)
    assert not applies(*qkv(KEEP_SCORES_UP_TO + 4), [3, KEEP_SCORES_UP_TO + 1], 0.0)
    query, key, value = qkv(10)
    assert not applies(query, key, value.double(), [4, 6], 0.0)
    assert not applies(query, key, torch.zeros(1, 3, 10, 2 * HEAD_DIM), [4, 6], 0.0)
