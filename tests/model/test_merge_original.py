"""quant.bits=16 on an adapter trained on a 4-bit base: merged into the original 16-bit weights
(peft's merge_and_unload on a 16-bit base, how most QLoRA adapters are deployed), with a warning
naming the difference; the default still merges into the dequantised base training saw."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from _checkpoints import ONE_THREAD, make_checkpoint, one_thread, tiny_recipe
from conftest import run_cli
from trainer.evaluation.export import ExportOptions, export

import pytest


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def test_quant_bits_16_merges_a_4bit_adapter_into_the_original_weights(tmp_path, tiny_base, capsys):
    adapter = make_checkpoint(tmp_path / "run")  # trained (made) on the 4-bit base
    export(tiny_recipe("quant.bits=16", "model.dtype=float32"), ExportOptions(adapter=str(adapter), out=str(tmp_path / "sixteen")))
    printed = capsys.readouterr().out
    assert "warning: the adapter was trained on the 4-bit quantised base" in printed
    assert "original 16-bit weights" in printed and "quant.bits=4" in printed
    export(tiny_recipe(), ExportOptions(adapter=str(adapter), out=str(tmp_path / "original"), base="original"))
    export(tiny_recipe(), ExportOptions(adapter=str(adapter), out=str(tmp_path / "dequantised")))
    sixteen, original, dequantised = (load_file(str(tmp_path / name / "model.safetensors"))
                                      for name in ("sixteen", "original", "dequantised"))
    for key, value in sixteen.items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert (sixteen[attention] - dequantised[attention]).abs().max() > 1e-3  # the quantisation error is back


def test_eval_accepts_quant_bits_16_with_the_warning(tmp_path, tiny_base):
    adapter = make_checkpoint(tmp_path / "run")
    result = run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={adapter}", "quant.bits=16",
                      "eval.max_rows=4", "eval.max_new_tokens=4", f"out={tmp_path / 'eval'}"], env=ONE_THREAD)
    assert "original 16-bit weights" in result.stdout + result.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()
