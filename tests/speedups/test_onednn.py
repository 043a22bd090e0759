"""The frozen layers' products through oneDNN (trainer/speedups/onednn.py) give torch's numbers up to float
rounding, with the same gradients, and step aside wherever they do not apply."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.speedups import onednn
from trainer.model.adapters import adapter_parameters
from trainer.model.dequantise import dequantised_weight
from trainer.loss import CausalLMLoss
from trainer.data.packing import collate_packed
from tests.speedups.test_fused import lora_model
from tests.test_loss import examples  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Shapes of the products that went to oneDNN."""
    seen, real = [], torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(x, weight, *args):
            seen.append((tuple(x.shape), tuple(weight.shape)))
            return real(x, weight, *args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy)
    return seen


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_f_linear(calls, transposed, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 40, 24)
    weight = torch.randn(24, 36).t() if transposed else torch.randn(36, 24)
    b = torch.randn(36) if bias else None
    out = onednn.linear(x, weight, b)
    assert out.shape == (3, 40, 36) and calls == [((120, 24), (36, 24))]
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_linear_leaves_small_and_non_fp32_products_to_torch(calls):
    torch.manual_seed(0)
    weight = torch.randn(36, 24)
    small = torch.randn(onednn.MIN_ROWS - 1, 24)
    assert torch.equal(onednn.linear(small, weight), F.linear(small, weight))
    half = torch.randn(100, 24, dtype=torch.bfloat16)
    assert torch.equal(onednn.linear(half, weight.bfloat16()), F.linear(half, weight.bfloat16()))
    assert calls == []


def test_frozen_layers_keep_loss_and_adapter_gradients(small_base_path, small_tokenizer, examples, calls,  # noqa: F811
                                                      monkeypatch):
    monkeypatch.setattr(onednn, "MIN_ROWS", 1)  # this batch trains fewer tokens than the threshold
    batch = collate_packed(examples, 64, small_tokenizer.pad_token_id)
    results = {}
    for routed in (False, True):
        model = lora_model(small_base_path, ("mlp", "norm"))
        if routed:
            layers = model.config.num_hidden_layers
            assert onednn.use_onednn_linear(model) == 7 * layers + 1  # q, k, v, o, gate, up, down; the head
        loss_sum, _ = CausalLMLoss(model)(**batch)
        loss_sum.backward()
        results[routed] = loss_sum.detach(), adapter_parameters(model)
        if not routed:
            assert calls == []
    # Forward: the 4-bit layers and the vocabulary projection. Backward: the same, but for the first
    # layer's q, k and v, whose input (the embeddings) needs no gradient.
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    assert len(calls) == 2 * (7 * layers + 1) - 3
    assert [w for _, w in calls].count((vocab, hidden)) == 1 and [w for _, w in calls].count((hidden, vocab)) == 1
    (plain_loss, plain_params), (loss, params) = results[False], results[True]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for name, parameter in plain_params.items():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(params[name].grad, parameter.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("vendor, library", [("GenuineIntel", onednn.TORCH), ("AuthenticAMD", onednn.ONEDNN)])
def test_the_faster_library_is_torchs_mkl_on_intel_processors_only(tmp_path, vendor, library):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: avx512f\n\n")
    assert onednn.faster_library(str(cpuinfo)) == library
    assert onednn.faster_library(str(tmp_path / "missing")) == onednn.ONEDNN


def test_routed_through_torchs_product_the_layers_give_the_same_numbers_without_onednn(calls):
    from tests.model.test_lora import quantised_linear

    torch.manual_seed(0)
    model = nn.Sequential(quantised_linear(4, nn.Linear(64, 48)), nn.Linear(48, 40)).requires_grad_(False)
    x = torch.randn(100, 64, requires_grad=True)
    results = {}
    for library in (onednn.ONEDNN, onednn.TORCH):  # routed again: the second binding replaces the first
        assert onednn.use_onednn_linear(model, library) == 2
        assert onednn.product_of(model[1]) is onednn.PRODUCTS[library]
        out = model(x)
        results[library] = out, torch.autograd.grad(out, x, torch.ones_like(out))[0]
        assert len(calls) == 4  # oneDNN's two layers, forward and backward; none for torch's
    for expected, got in zip(results[onednn.ONEDNN], results[onednn.TORCH]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_frozen_linear_gradient_is_the_inputs_only():
    torch.manual_seed(0)
    layer = nn.Linear(24, 36).requires_grad_(False)
    assert onednn.use_onednn_linear(layer) == 1
    x = torch.randn(2, 50, 24, requires_grad=True)
    grad = torch.randn(2, 50, 36)
    out = layer(x)
    (got,) = torch.autograd.grad(out, x, grad)
    x2 = x.detach().clone().requires_grad_()
    expected = F.linear(x2, layer.weight, layer.bias)
    (reference,) = torch.autograd.grad(expected, x2, grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_trained_partitioned_or_unfitting_layers_keep_their_own_path(calls):
    torch.manual_seed(0)
    trained, frozen = nn.Linear(24, 36), nn.Linear(24, 36).requires_grad_(False)
    assert onednn.use_onednn_linear(nn.Sequential(trained, frozen)) == 1  # a trained weight is left alone
    x = torch.randn(100, 24)
    frozen.weight.ds_id = 7  # a ZeRO-3 parameter: DeepSpeed gathers it around the layer's own forward
    frozen(x)
    del frozen.weight.ds_id
    frozen.bias.requires_grad_(True)  # a trained bias needs its gradient
    out = frozen(x)
    out.sum().backward()
    assert frozen.bias.grad is not None
    assert calls == []
    frozen.bias.requires_grad_(False)
    frozen(x)
    assert len(calls) == 1


@pytest.mark.parametrize("rows", [onednn.MIN_ROWS - 1, onednn.MIN_ROWS])
def test_a_4bit_layer_with_a_bias_gives_bitsandbytes_value_and_input_gradient(calls, rows):
    from tests.model.test_lora import quantised_linear

    torch.manual_seed(0)
    layer = quantised_linear(4, nn.Linear(64, 48))  # NF4, double quant, fp32 compute, a frozen bias
    x, grad = torch.randn(rows, 64, requires_grad=True), torch.randn(rows, 48)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    assert onednn.use_onednn_linear(layer) == 1 and calls == []
    out = layer(x)
    (got,) = torch.autograd.grad(out, x, grad)
    assert len(calls) == (2 if rows >= onednn.MIN_ROWS else 0)  # forward and backward, or neither
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", [onednn.ONEDNN, onednn.TORCH])
def test_a_4bit_layer_computing_in_bf16_gives_bitsandbytes_bf16_value_and_input_gradient(library):
    """quant.compute_dtype=bfloat16 under an fp32 model: the routed layer decodes its weight into bf16
    and multiplies in bf16, fp32 in and out, as bitsandbytes' own forward does."""
    from tests.model.test_lora import quantised_linear

    torch.manual_seed(0)
    layer = quantised_linear(4, nn.Linear(64, 48))
    x, grad = torch.randn(onednn.MIN_ROWS, 64, requires_grad=True), torch.randn(onednn.MIN_ROWS, 48)
    exact = layer(x)  # fp32 compute
    layer.compute_dtype = torch.bfloat16
    reference = copy.deepcopy(layer)  # bitsandbytes' bf16 forward rounds its bias to bf16 in place
    expected = reference(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    assert onednn.use_onednn_linear(layer, library) == 1
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FrozenLinearBackward" and out.dtype == torch.float32
    (got,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The same bf16 product as bitsandbytes', its sums in another order:
    torch.testing.assert_close(got, expected_grad, rtol=2e-2, atol=2e-2)
    weight = dequantised_weight(layer).bfloat16()
    assert torch.equal(got, (grad.bfloat16() @ weight).float())  # the backward's product in bf16 too
    assert not torch.equal(out, exact)  # the products did run in bf16
    # A call the route declines (a few rows) runs bitsandbytes' forward, which rounds the bias to bf16
    # in place; the layer still takes the route afterwards.
    layer(torch.randn(2, 64))
    assert layer.bias.dtype == torch.bfloat16
    assert type(layer(x).grad_fn).__name__ == "FrozenLinearBackward"


def test_4bit_layers_zero3_parameters_and_autocast_keep_their_own_path(calls):
    from tests.model.test_lora import quantised_linear

    torch.manual_seed(0)
    partitioned = quantised_linear(4, nn.Linear(64, 48))
    frozen = nn.Linear(64, 48).requires_grad_(False)
    assert onednn.use_onednn_linear(nn.Sequential(partitioned, frozen)) == 2
    x = torch.randn(100, 64)
    partitioned.weight.ds_id = 3
    partitioned(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen(x).dtype == torch.bfloat16
    assert calls == []
    frozen(x)
    assert len(calls) == 1


def test_a_model_with_routed_layers_pickles(calls):
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 36), nn.Linear(36, 8)).requires_grad_(False)
    onednn.use_onednn_linear(model)
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(100, 24)
    assert torch.equal(copy(x), model(x)) and len(calls) == 4  # the copy is routed too


# Resident memory a process gains over 400 products of new shapes (after 200 to fill the caches).
CACHE_GROWTH = """
import torch
from trainer.speedups import onednn
torch.set_num_threads(1)
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
weight = torch.randn(96, 64)
for rows in range(100, 700):
    if rows == 300:
        before = rss_mib()
    onednn.linear(torch.randn(rows, 64), weight)
print(rss_mib() - before)
"""
LIBRARY_DEFAULT_CAPACITY = 1024  # oneDNN's primitive cache and ideep's LRU cache


@pytest.mark.slow
def test_capped_caches_keep_memory_flat_where_either_default_grows_it():
    # oneDNN and ideep each keep cache entries per product shape, and packed batches change shapes
    # every step. How much an entry weighs depends on the machine (its kernels, its allocator), so the
    # capped run is measured against runs in which one cache at a time has its library default:
    # here each of those grows by 160-250 MB, the capped one by under 1 MB.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = {k: v for k, v in os.environ.items() if k not in onednn.CACHE_VARIABLES}

    def growth(capacities: dict[str, int]) -> float:
        env = {**environment, **{name: str(capacity) for name, capacity in capacities.items()}}
        out = subprocess.run([sys.executable, "-c", CACHE_GROWTH], env=env, capture_output=True, text=True,
                             check=True, cwd=root)
        return float(out.stdout)

    capped = dict.fromkeys(onednn.CACHE_VARIABLES, onednn.CACHE_CAPACITY)
    flat = growth(capped)
    for name in onednn.CACHE_VARIABLES:
        grown = growth({**capped, name: LIBRARY_DEFAULT_CAPACITY})
        assert flat < 0.1 * grown, f"{flat:.1f} MB capped, {grown:.1f} MB with {name}={LIBRARY_DEFAULT_CAPACITY}"
