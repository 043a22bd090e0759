"""LoRA dropout from random bytes (trainer/speedups/dropout_masks.py): masks at the asked rate, the
masked product's value and gradients are autograd's, q, k and v keep their shared input once, and
evaluation runs LoRALinear's own forward."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from trainer.model.lora import LoRALinear
from trainer.speedups import dropout_masks
from trainer.speedups.dropout_masks import dropout_keep_mask, use_dropout_masks
from tests.speedups.test_fused import saved_bytes


def masked_layer(dropout: float, size: int = 32, out: int = 16, dora: bool = False) -> LoRALinear:
    layer = LoRALinear(nn.Linear(size, out, bias=False).requires_grad_(False), r=4, alpha=8, dropout=dropout, dora=dora)
    nn.init.normal_(layer.lora_B.weight)
    assert use_dropout_masks(layer) == (1 if dropout > 0 else 0)
    return layer


@pytest.mark.parametrize("mask", ["_keep_in_numpy", "_keep_in_torch"])  # CPU's, and other devices'
def test_both_mask_comparisons_drop_at_the_boundary_rate(mask):
    torch.manual_seed(0)
    boundary, rest = 25, 39322  # p = 0.1: (25 * 2^16 + 39322) / 2^24
    levels = dropout_masks._random(4_000_000, torch.uint8, torch.device("cpu"))
    keep = getattr(dropout_masks, mask)(levels, boundary, rest)
    assert keep.dtype == torch.bool and keep.shape == (4_000_000,)
    assert abs((~keep).float().mean().item() - (boundary * 2**16 + rest) / 2**24) < 4e-4


def test_masks_drop_at_the_asked_rate():
    torch.manual_seed(0)
    # 0.1 needs the 16 further bits for bytes on its boundary (25 + 0.6 in 256); 0.25 does not (64 in 256).
    # Keeping or dropping every boundary byte would be off by >= 1.5e-3 from the asked rate, and the
    # comparison of those bits the wrong way round by 7.8e-4.
    for p in (0.1, 0.25):
        keep, keep_probability = dropout_keep_mask(torch.empty(4000, 1000), p)
        assert keep.dtype == torch.bool and keep.shape == (4000, 1000) and abs(keep_probability - (1 - p)) < 2**-24
        assert abs(keep.float().mean().item() - keep_probability) < 4e-4  # 4e6 draws: std <= 2.2e-4
    assert dropout_keep_mask(torch.empty(100, 100), 0.0)[0].all()


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_lora_a_with_a_dropout_mask_is_autograds_masked_linear(x_needs_grad):
    torch.manual_seed(0)
    layer = masked_layer(0.3, 16, 12).train()
    x = torch.randn(2, 5, 16, requires_grad=x_needs_grad)
    torch.manual_seed(1)
    out = layer(x)
    out.square().sum().backward()
    got = [layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()] + ([x.grad.clone()] if x_needs_grad else [])

    torch.manual_seed(1)
    keep, keep_probability = dropout_keep_mask(x, 0.3)
    a, b = (layer.lora_A.weight.detach().clone().requires_grad_(), layer.lora_B.weight.detach().clone().requires_grad_())
    x2 = x.detach().clone().requires_grad_(x_needs_grad)
    expected = layer.base_layer(x2) + (layer.scaling / keep_probability) * ((x2 * keep) @ a.t() @ b.t())
    torch.testing.assert_close(out, expected)
    expected.square().sum().backward()
    for value, reference in zip(got, [a.grad, b.grad] + ([x2.grad] if x_needs_grad else [])):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


def test_q_k_v_adapters_keep_one_copy_of_their_shared_input():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    layers = [masked_layer(0.1, 32, 32).train() for _ in range(3)]
    _, saved = saved_bytes(lambda: [layer(x) for layer in layers])
    # x once (fp32) and a bool mask per adapter, plus each layer's base weight, A, B and h = A(x):
    # not a masked fp32 copy of x per adapter (that alone would be 3 x 8 KiB).
    per_adapter = x.numel() + 32 * 32 * 4 + 2 * 4 * 32 * 4 + 64 * 4 * 4
    assert saved == x.numel() * 4 + 3 * per_adapter
    plain = [LoRALinear(nn.Linear(32, 32, bias=False).requires_grad_(False), r=4, alpha=8, dropout=0.1).train()
             for _ in range(3)]
    _, plain_saved = saved_bytes(lambda: [layer(x) for layer in plain])
    assert plain_saved >= saved + 2 * x.numel() * 4  # nn.Dropout: a dropped-out fp32 copy per adapter, not x once


@pytest.mark.parametrize("dora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_evaluation_runs_the_layers_own_forward_and_training_is_unbiased(dora):
    torch.manual_seed(0)
    layer = masked_layer(0.25, dora=dora)
    plain = LoRALinear(layer.base_layer, r=4, alpha=8, dropout=0.25, dora=dora)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(6, 32)
    layer.eval()
    expected = layer(x)
    assert torch.equal(expected, plain.eval()(x))  # eval: no mask, the plain layer's numbers
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first) and not torch.equal(first, expected)  # seeded masks
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    update = expected - layer.base_layer(x)
    assert (mean - expected).norm() / update.norm() < 0.03  # inverted dropout: unbiased in expectation


def test_only_adapters_with_dropout_change_and_the_model_still_pickles():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(32, 32), r=4, alpha=8, dropout=0.1),
                          LoRALinear(nn.Linear(32, 16), r=4, alpha=8))
    assert use_dropout_masks(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])  # p = 0: left as it is
    copy = pickle.loads(pickle.dumps(model)).train()
    x = torch.randn(8, 32)
    torch.manual_seed(1)
    out = model.train()(x)
    torch.manual_seed(1)
    assert torch.equal(copy(x), out)  # the copy draws the same byte masks
