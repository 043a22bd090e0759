"""The fused SwiGLU and RMSNorm ops with their passes compiled by torch.compile
(trainer/speedups/compiled.py) give the eager ops' values and gradients up to float rounding, turn on
where `train.compiled_kernels` says, and run eager, with one warning, where compiling fails."""
from __future__ import annotations

import logging
import os
import pickle
import shutil

import pytest
import torch

from trainer import speedups
from trainer.recipe_loading import recipe_from_dict
from trainer.speedups import compiled, fused
from tests.speedups.test_apply import lora_model, modules_named

CPU = torch.device("cpu")
# inductor builds its CPU loops with this C++ compiler; without one the kernels run eager (tested below)
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="torch.compile's CPU loops need a C++ compiler (g++, or $CXX)")


@needs_compiler
def test_compiled_silu_mul_gives_the_eager_values_and_gradients():
    torch.manual_seed(0)
    gate, up = (torch.randn(300, 96, requires_grad=True) for _ in range(2))
    grad = torch.randn(300, 96)
    values = {}
    for kernels in (None, compiled.KERNELS):
        out = fused.SiluMul.apply(gate, up, kernels)
        values[kernels] = (out, *torch.autograd.grad(out, (gate, up), grad))
    assert compiled.KERNELS.usable
    assert compiled.KERNELS.silu_mul.compiled and compiled.KERNELS.silu_mul_grads.compiled  # both ran
    for eager, loops in zip(values[None], values[compiled.KERNELS]):
        torch.testing.assert_close(loops, eager, rtol=1e-5, atol=1e-6)
    # another row count (packed batches change it every step) runs the same compiled code
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = fused.SiluMul.apply(gate[:77], up[:77], compiled.KERNELS)
    assert compiled.KERNELS.usable  # a recompile would have failed, and switched the kernels off
    torch.testing.assert_close(out, fused.SiluMul.apply(gate[:77], up[:77]), rtol=1e-5, atol=1e-6)


@needs_compiler
def test_compiled_rms_norm_gives_the_eager_values_and_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 150, 64, requires_grad=True)
    weight = torch.rand(64) + 0.5
    grad = torch.randn(2, 150, 64)
    values = {}
    for kernels in (None, compiled.KERNELS):
        out = fused.RMSNormFunction.apply(x, weight, 1e-5, kernels)
        values[kernels] = (out, *torch.autograd.grad(out, x, grad))
    assert compiled.KERNELS.usable
    assert compiled.KERNELS.rms_norm.compiled and compiled.KERNELS.rms_norm_input_grad.compiled
    for eager, loops in zip(values[None], values[compiled.KERNELS]):
        torch.testing.assert_close(loops, eager, rtol=1e-5, atol=1e-5)


def test_kernels_that_cannot_compile_run_eager_and_say_so_once(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernels = compiled.Kernels()
    gate, up = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        first = kernels.silu_mul(gate, up)  # this call: the formula, eager
        assert not kernels.usable
        out = fused.SiluMul.apply(gate, up, kernels)  # from then on: the fused op's own eager passes
        out.sum().backward()
        kernels.rms_norm_input_grad(gate, gate, up[0], up[:, :1])
    assert torch.equal(first, out) and torch.equal(out, fused.SiluMul.apply(gate, up))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler found" in warnings[0] and "run eager" in warnings[0]


def test_an_error_the_eager_formula_raises_too_is_not_blamed_on_the_compiler():
    kernels = compiled.Kernels()
    with pytest.raises(RuntimeError, match="size"):
        kernels.silu_mul(torch.randn(5, 3), torch.randn(4, 3))
    assert kernels.usable


@needs_compiler
def test_evaluation_during_training_runs_the_eager_forwards(small_base_path, monkeypatch):
    model, recipe = lora_model(small_base_path, {"train": {"compiled_kernels": True}})
    speedups.apply(model, recipe, CPU)
    calls, real = [], compiled.Kernel.__call__

    def counting(self, *args):
        calls.append(self.function.__name__)
        return real(self, *args)

    monkeypatch.setattr(compiled.Kernel, "__call__", counting)
    x = torch.randint(3, 100, (1, 70))
    with torch.no_grad():
        model(input_ids=x)
    assert calls == []  # transformers' numbers, as launch/eval.py scores them
    model(input_ids=x, labels=x).loss.backward()
    assert {"silu_mul", "silu_mul_grads", "rms_norm", "rms_norm_input_grad"} <= set(calls)


@pytest.mark.parametrize("setting, device, hidden, expected", [
    (None, "cpu", 576, True), (None, "cpu", 128, False), (None, "cuda", 4096, False),
    (True, "cpu", 128, True), (False, "cpu", 576, False), (True, "cuda", 4096, False)])
def test_auto_compiles_for_cpu_bases_at_least_512_wide_and_never_off_the_cpu(setting, device, hidden, expected):
    assert compiled.wanted(setting, torch.device(device), hidden) is expected


@needs_compiler
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
    assert torch.isfinite(loss) and compiled.KERNELS.usable
    assert all(isinstance(p.grad, torch.Tensor) for p in model.parameters() if p.requires_grad)


def test_recipe_key_is_null_true_or_false():
    assert recipe_from_dict({}).train.compiled_kernels is None
    assert recipe_from_dict({"train": {"compiled_kernels": "false"}}).train.compiled_kernels is False
    assert recipe_from_dict({"train": {"compiled_kernels": None}}).train.compiled_kernels is None
