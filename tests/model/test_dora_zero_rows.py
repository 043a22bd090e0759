"""DoRA over a base weight with an all-zero row (an lm_head tied to an embedding whose padding row is
zero, as the tiny base's) or, for an embedding, an all-zero dimension: m starts at ||W_row|| = 0 and
the norm is 0, so m / ||V|| was 0/0. The row must give the base's zero, gradients and merges stay
finite, unmerge gives the base back, and every row with a norm computes what it did, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _checkpoints import one_thread
from test_merge_tied_head import IDS, tied_tiny_base
from trainer.model.lora import LoRALinear, apply_lora
from trainer.model.lora_embedding import LoRAEmbedding

ZERO = 2  # the all-zero row (Linear) or dimension (Embedding)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def zero_row_layer(bias: bool = False, zero: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=bias)
    with torch.no_grad():
        if zero:
            base.weight[ZERO] = 0
        if bias:
            base.bias.normal_()
    base.requires_grad_(False)  # frozen, as apply_lora leaves it
    return LoRALinear(base, r=4, alpha=8, dora=True)


def old_dora_output(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The forward as it was: m / ||V|| with no guard (NaN on a zero-norm row), the same operations."""
    result = layer.base_layer(x)
    h = layer.lora_A(x)
    scale = layer.lora_magnitude_vector / layer.weight_norm()
    bias = layer.base_layer.bias
    base = result if bias is None else result - bias
    return result + ((scale - 1) * base + scale * (layer.lora_B(h) * layer.scaling))


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def other_rows(size: int) -> list[int]:
    return [i for i in range(size) if i != ZERO]


def train_step(layer: nn.Module, x: torch.Tensor) -> None:
    """One SGD step on a loss that reaches every row; asserts the gradients are finite."""
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).float().sin().sum().backward()
    for name, parameter in layer.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and finite(parameter.grad), name
    optimizer.step()
    optimizer.zero_grad()


# ------------------------------------------------------------------------------ Linear

@pytest.mark.parametrize("bias", [False, True])
def test_a_zero_row_gives_the_base_output_and_other_rows_are_unchanged_bit_for_bit(bias):
    layer = zero_row_layer(bias)
    assert layer.lora_magnitude_vector[ZERO] == 0 and layer.weight_norm()[ZERO] == 0
    with torch.no_grad():  # B off zero except on the zero row, m off ||W||: a non-trivial scale elsewhere
        layer.lora_B.weight.normal_(std=0.1)
        layer.lora_B.weight[ZERO] = 0
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(6))
    x = torch.randn(3, 5, 8)

    out = layer(x)
    assert finite(out)
    if bias:
        torch.testing.assert_close(out[..., ZERO], layer.base_layer(x)[..., ZERO])
    else:
        assert torch.equal(out[..., ZERO], torch.zeros_like(out[..., ZERO]))
    rows = other_rows(6)
    assert torch.equal(out[..., rows], old_dora_output(layer, x)[..., rows])

    # Backward too: the other rows' gradients of m and B are those of m / ||V|| (A's gradient,
    # a sum over all rows, was NaN through the zero row's 0/0).
    old = zero_row_layer(bias)
    old.load_state_dict(layer.state_dict())
    out.square().sum().backward()
    old_dora_output(old, x)[..., rows].square().sum().backward()
    assert finite(layer.lora_A.weight.grad)
    assert torch.equal(layer.lora_magnitude_vector.grad[rows], old.lora_magnitude_vector.grad[rows])
    assert torch.equal(layer.lora_B.weight.grad[rows], old.lora_B.weight.grad[rows])


def test_a_zero_row_keeps_gradients_finite_and_training_finite():
    layer = zero_row_layer()
    x = torch.randn(4, 8)
    train_step(layer, x)
    assert layer.lora_B.weight[other_rows(6)].abs().sum() > 0  # B has moved off zero
    out = layer(x)
    assert finite(out)
    assert torch.equal(out[:, ZERO], torch.zeros(4))  # m = 0 there: the row stays the base's zero
    train_step(layer, x)
    assert finite(layer(x))


def cancelled_row(layer: LoRALinear) -> None:
    """W_row = -scaling * (B @ A)_row exactly (small integers): ||V_row|| = 0 with m_row > 0."""
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randint(-2, 3, layer.lora_A.weight.shape).float())
        layer.lora_B.weight.copy_(torch.randint(-2, 3, layer.lora_B.weight.shape).float())
        layer.lora_B.weight[ZERO] = torch.tensor([1.0, -1.0, 2.0, 1.0])
        layer.base_layer.weight[ZERO] = -layer.scaling * (layer.lora_B.weight[ZERO] @ layer.lora_A.weight)
    assert layer.weight_norm()[ZERO] == 0 and layer.lora_magnitude_vector[ZERO] > 0


@pytest.mark.parametrize("case", ["trained", "zero_row_with_b", "cancelled"])
def test_merge_and_unmerge_with_a_zero_factor_row(case):
    """trained: a step from the start (||V_row|| stays 0); zero_row_with_b: B's row set on the zero
    base row (m = 0, ||V_row|| > 0, as test_merge_tied_head adapts the head); cancelled: ||V_row|| = 0
    with a nonzero base row. Merging zeroes the row in each case; unmerge must give the base back."""
    layer = zero_row_layer(zero=case != "cancelled")
    x = torch.randn(4, 8)
    if case == "trained":
        train_step(layer, x)
    elif case == "zero_row_with_b":
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.1)
    else:
        cancelled_row(layer)
    base = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
    assert finite(expected)

    layer.merge()
    merged = layer.base_layer.weight
    assert finite(merged) and torch.equal(merged[ZERO], torch.zeros(8))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

    layer.unmerge()
    restored = layer.base_layer.weight
    assert finite(restored) and torch.equal(restored[ZERO], base[ZERO])
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_the_tied_tiny_base_head_with_dora_starts_finite_and_merges_back(tiny_base):
    """The case in the project: the tiny base's padding row of embed_tokens is zero, so a tied
    lm_head adapted with DoRA has a zero row."""
    model = tied_tiny_base(tiny_base)
    pad = model.model.embed_tokens.padding_idx
    assert pad is not None and torch.equal(model.lm_head.weight[pad], torch.zeros(model.config.hidden_size))
    head = model.lm_head.weight.detach().clone()
    apply_lora(model, ["lm_head"], r=4, alpha=8, dora=True)
    ids = torch.tensor([IDS])

    out = model(input_ids=ids, labels=ids)
    assert finite(out.logits) and torch.isfinite(out.loss)
    assert torch.equal(out.logits[0, :, pad], torch.zeros(len(IDS)))
    out.loss.backward()
    assert all(finite(p.grad) for p in model.parameters() if p.requires_grad)

    with torch.no_grad():  # as after training with B off zero on every row
        model.lm_head.lora_B.weight.normal_(std=0.1)
        expected = model(input_ids=ids).logits
        model.lm_head.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        model.lm_head.unmerge()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.lm_head.base_layer.weight[pad], head[pad])
    torch.testing.assert_close(model.lm_head.base_layer.weight, head, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ Embedding

def zero_dimension_embedding() -> LoRAEmbedding:
    """An embedding one of whose dimensions is zero for every token: DoRA's norm over the vocabulary
    is 0 there."""
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    with torch.no_grad():
        base.weight[:, ZERO] = 0
    base.requires_grad_(False)
    return LoRAEmbedding(base, r=4, alpha=8, dora=True)


def old_embedding_output(layer: LoRAEmbedding, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    update = (layer.lora_embedding_A.t()[x] @ layer.lora_embedding_B.t()) * layer.scaling
    scale = layer.lora_magnitude_vector / layer.weight_norm()
    return scale * (result + update)


def test_a_zero_embedding_dimension_gives_zero_and_other_dimensions_are_unchanged_bit_for_bit():
    layer = zero_dimension_embedding()
    assert layer.lora_magnitude_vector[ZERO] == 0 and layer.weight_norm()[ZERO] == 0
    with torch.no_grad():  # A off zero, B's row of the zero dimension zero: ||V_d|| stays 0 there
        layer.lora_embedding_A.normal_(std=0.3)
        layer.lora_embedding_B[ZERO] = 0
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(6))
    x = torch.tensor([[1, 4, 4, 9, 0]])

    out = layer(x)
    assert finite(out) and torch.equal(out[..., ZERO], torch.zeros(1, 5))
    dims = other_rows(6)
    assert torch.equal(out[..., dims], old_embedding_output(layer, x)[..., dims])


def test_a_zero_embedding_dimension_trains_merges_and_unmerges_finite():
    layer = zero_dimension_embedding()
    x = torch.tensor([[1, 4, 4, 9, 0, 3]])
    base = layer.weight.detach().clone()
    train_step(layer, x)
    assert layer.lora_embedding_A.abs().sum() > 0  # A has moved off zero
    with torch.no_grad():
        expected = layer(x)
    assert finite(expected) and torch.equal(expected[..., ZERO], torch.zeros(1, 6))

    layer.merge()
    assert finite(layer.weight) and torch.equal(layer.weight[:, ZERO], torch.zeros(10))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

    layer.unmerge()
    assert finite(layer.weight) and torch.equal(layer.weight[:, ZERO], base[:, ZERO])
    torch.testing.assert_close(layer.weight, base, rtol=1e-5, atol=1e-6)
