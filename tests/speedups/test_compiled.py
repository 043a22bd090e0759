"""The fused SwiGLU and RMSNorm ops with their passes compiled by torch.compile
(trainer/speedups/compiled.py) give the eager ops' values and gradients up to float rounding, turn on
where `train.compiled_kernels` says, and run eager, with one warning, where compiling fails."""
from __future__ import annotations

import logging
import pickle

import pytest
import torch

from trainer import speedups
from trainer.config import recipe_from_dict
from trainer.speedups import compiled, fused
from tests.speedups.test_apply import lora_model, modules_named

CPU = torch.device("cpu")


def test_compiled_silu_mul_gives_the_eager_values_and_gradients():
    torch.manual_seed(0)
    gate, up = (torch.randn(300, 96, requires_grad=True) for _ in range(2))
    grad = torch.randn(300, 96)
    values = {}
    for kernels in (None, compiled.KERNELS):
        out = fused.SiluMul.apply(gate, up, kernels)
        values[kernels] = (out, *torch.autograd.grad(out, (gate, up), grad))
    assert not compiled.KERNELS.silu_mul.failed and not compiled.KERNELS.silu_mul_backward.failed
    for eager, loops in zip(values[None], values[compiled.KERNELS]):
        torch.testing.assert_close(loops, eager, rtol=1e-5, atol=1e-6)
    # another row count (packed batches change it every step) runs the same compiled code
    out = fused.SiluMul.apply(gate[:77], up[:77], compiled.KERNELS)
    torch.testing.assert_close(out, fused.SiluMul.apply(gate[:77], up[:77]), rtol=1e-5, atol=1e-6)


def test_compiled_rms_norm_gives_the_eager_values_and_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 150, 64, requires_grad=True)
    weight = torch.rand(64) + 0.5
    grad = torch.randn(2, 150, 64)
    values = {}
    for kernels in (None, compiled.KERNELS):
        out = fused.RMSNormFunction.apply(x, weight, 1e-5, kernels)
        values[kernels] = (out, *torch.autograd.grad(out, x, grad))
    assert not compiled.KERNELS.rms_norm.failed and not compiled.KERNELS.rms_norm_backward.failed
    for eager, loops in zip(values[None], values[compiled.KERNELS]):
        torch.testing.assert_close(loops, eager, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_cannot_compile_runs_eager_and_says_so_once(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernel = compiled.Kernel(compiled._silu_mul)
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        first, second = kernel(gate, up), kernel(gate, up)
    assert kernel.failed and torch.equal(first, compiled._silu_mul(gate, up)) and torch.equal(second, first)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler found" in warnings[0] and "running it eager" in warnings[0]


@pytest.mark.parametrize("setting, device, hidden, expected", [
    (None, "cpu", 576, True), (None, "cpu", 128, False), (None, "cuda", 4096, False),
    (True, "cpu", 128, True), (False, "cpu", 576, False)])
def test_auto_compiles_for_cpu_bases_at_least_512_wide(setting, device, hidden, expected):
    assert compiled.wanted(setting, torch.device(device), hidden) is expected


def test_apply_binds_the_compiled_loops_where_asked_and_the_model_still_pickles(small_base_path):
    model, recipe = lora_model(small_base_path)  # 128 wide: auto leaves them eager
    speedups.apply(model, recipe, CPU)
    mlps, norms = modules_named(model, "LlamaMLP"), modules_named(model, "LlamaRMSNorm")
    assert all(m.forward.keywords.get("kernels") is None for m in mlps + norms)
    model, recipe = lora_model(small_base_path, {"train": {"compiled_kernels": True}})
    switched = speedups.apply(model, recipe, CPU)
    assert any("compiled loops" in line for line in switched)
    mlps, norms = modules_named(model, "LlamaMLP"), modules_named(model, "LlamaRMSNorm")
    assert all(m.forward.keywords["kernels"] is compiled.KERNELS for m in mlps + norms)
    assert all(m.forward.func in (fused._swiglu_forward, fused._rms_norm_forward) for m in mlps + norms)
    copy = pickle.loads(pickle.dumps(model))
    assert modules_named(copy, "LlamaMLP")[0].forward.keywords["kernels"] is compiled.KERNELS
    x = torch.randint(3, 100, (1, 70))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(isinstance(p.grad, torch.Tensor) for p in model.parameters() if p.requires_grad)


def test_recipe_key_is_null_true_or_false():
    assert recipe_from_dict({}).train.compiled_kernels is None
    assert recipe_from_dict({"train": {"compiled_kernels": "false"}}).train.compiled_kernels is False
    assert recipe_from_dict({"train": {"compiled_kernels": None}}).train.compiled_kernels is None
