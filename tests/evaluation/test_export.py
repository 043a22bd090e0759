"""Merge and export: the merged model computes what base + adapter computed, loads in a fresh process
with plain transformers, and agrees with PEFT's merge_and_unload."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _checkpoints import ONE_THREAD, make_checkpoint, one_thread, our_model, tiny_recipe
from conftest import run_cli
from trainer.checkpoint import saving
from trainer.evaluation.export import ExportOptions, export

IDS = [1, 45, 67, 89, 120, 300, 13, 13, 500, 7]

# Run with plain transformers in a fresh interpreter, from a temporary cwd, with our package made
# unimportable: the export must not need it.
FRESH_LOAD = """
import json, sys
sys.modules["trainer"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"class": type(model).__name__, "quantized": bool(getattr(model, "is_quantized", False)),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "linear_types": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "in_features")}),
                  "vocab": len(tokenizer)}))
"""

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def load_fresh(model_dir: Path, tmp_path: Path) -> tuple[dict, torch.Tensor]:
    logits_path = tmp_path / "fresh_logits.pt"
    env = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, **ONE_THREAD}
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(model_dir), json.dumps(IDS), str(logits_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(logits_path)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits


def assert_plain_export(out: Path) -> dict[str, torch.Tensor]:
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(out / "model.safetensors"))
    assert all(tensor.dtype.is_floating_point for tensor in weights.values())
    assert not [key for key in weights if "lora_" in key or "base_layer" in key or "absmax" in key or "quant" in key]
    return weights


def test_unquantised_export_equals_base_plus_adapter_loads_fresh_and_matches_peft(tmp_path, tiny_base):
    adapter = make_checkpoint(tmp_path / "run", "quant.bits=16")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    (out / "notes.txt").chmod(0o600)
    run_cli(["launch/export.py", "recipes/tiny_alpaca.yaml", f"adapter={adapter}", f"out={out}", "quant.bits=16"],
            env=ONE_THREAD)
    weights = assert_plain_export(out)
    # readable as the umask allows (safetensors alone writes 0600); a file the export did not write is left alone
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~saving._umask()
    assert (out / "notes.txt").stat().st_mode & 0o777 == 0o600

    expected = logits_of(our_model(tiny_recipe("quant.bits=16"), adapter))
    info, fresh_logits = load_fresh(out, tmp_path)
    assert info == {"class": "LlamaForCausalLM", "quantized": False, "dtypes": ["torch.float32"],
                    "linear_types": ["Linear"], "vocab": 1001}
    torch.testing.assert_close(fresh_logits, expected, rtol=1e-5, atol=1e-5)
    assert (fresh_logits - logits_of(load_plain_base(tiny_base))).abs().max() > 1e-2  # the adapter did something

    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(load_plain_base(tiny_base), adapter).merge_and_unload()
    peft_weights = peft_merged.state_dict()
    assert set(peft_weights) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(value, peft_weights[key], rtol=0, atol=1e-6, msg=key)


def load_plain_base(tiny_base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


def test_4bit_export_dequantises_every_layer_and_equals_the_trained_model(tmp_path, tiny_base):
    # Only attention is adapted: the 4-bit MLP layers must be dequantised too.
    overrides = ["lora.target_modules=[q_proj,v_proj]"]
    adapter = make_checkpoint(tmp_path / "run", *overrides)
    recipe = tiny_recipe(*overrides)
    out = export(recipe, ExportOptions(adapter=str(adapter), out=str(tmp_path / "dequantised")))
    weights = assert_plain_export(out)
    meta = json.loads((out / "meta.json").read_text())  # the run's record, for chat (chat_rendered)
    assert meta["exported_from"] == str(adapter) and meta["base_fingerprint"] and meta["export_base"] == "dequantised"

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {type(m).__name__ for m in merged.modules() if hasattr(m, "in_features")} == {"Linear"}
    # The reference is what evaluation runs: the 4-bit base (dequantised on the fly by bitsandbytes) + adapter.
    torch.testing.assert_close(logits_of(merged), logits_of(our_model(recipe, adapter)), rtol=1e-4, atol=1e-4)

    # export.base=original merges into the full-precision weights from disk instead.
    original_out = export(recipe, ExportOptions(adapter=str(adapter), out=str(tmp_path / "original"), base="original"))
    original = load_file(str(original_out / "model.safetensors"))
    adapter_weights = load_file(str(adapter / "adapter_model.safetensors"))
    with safe_open(str(tiny_base / "model.safetensors"), "pt") as base_file:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj"):
            a = adapter_weights[f"base_model.model.{name}.lora_A.weight"]
            b = adapter_weights[f"base_model.model.{name}.lora_B.weight"]
            expected = base_file.get_tensor(f"{name}.weight") + b @ a * recipe.lora.alpha / recipe.lora.r
            torch.testing.assert_close(original[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        mlp = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(original[mlp], base_file.get_tensor(mlp))  # not adapted: the original weight
        # ... and the dequantised export carries the 4-bit approximation of it, close but not equal
        difference = (weights[mlp] - base_file.get_tensor(mlp)).abs()
        assert 0 < difference.max() < 0.05


def test_bfloat16_export_and_a_bad_option_are_handled(tmp_path, tiny_base):
    adapter = make_checkpoint(tmp_path / "run", "quant.bits=16")
    out = export(tiny_recipe("quant.bits=16"),
                 ExportOptions(adapter=str(adapter), out=str(tmp_path / "bf16"), dtype="bfloat16"))
    assert {t.dtype for t in assert_plain_export(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from trainer.config import RecipeError

    with pytest.raises(RecipeError, match="export.base must be"):
        export(tiny_recipe("quant.bits=16"), ExportOptions(adapter=str(adapter), out=str(tmp_path / "x"), base="raw"))


def test_export_dequantises_one_layer_at_a_time(tmp_path, tiny_base, monkeypatch):
    """Each layer is dequantised, merged, cast and moved before the next one is dequantised: at most
    one float32 layer is alive at once (on a GPU, all of them at once is ~26 GB for 7B)."""
    import trainer.evaluation.export as export_module

    made, alive_at_creation = [], []
    original = export_module.dequantised_linear

    def tracked(layer, dtype=None):
        alive_at_creation.append(sum(weight.dtype == torch.float32 for weight in made))
        linear = original(layer, dtype)
        made.append(linear.weight)  # the Parameter; a cast swaps its data, so its dtype says which copy is held
        return linear

    monkeypatch.setattr(export_module, "dequantised_linear", tracked)
    adapter = make_checkpoint(tmp_path / "run", "lora.target_modules=[q_proj,v_proj]")
    export(tiny_recipe("lora.target_modules=[q_proj,v_proj]"),
           ExportOptions(adapter=str(adapter), out=str(tmp_path / "out"), dtype="bfloat16"))
    assert len(made) >= 7 * 2  # every linear layer of every decoder layer (LoRA-wrapped or not)
    assert alive_at_creation == [0] * len(made)
    assert all(weight.dtype == torch.bfloat16 and weight.device.type == "cpu" for weight in made)


def test_a_bf16_runs_export_decodes_the_4bit_codes_quantised_from_bf16(tmp_path, tiny_base):
    """A GPU run loads the base in bf16 before quantising: its 4-bit codes differ from float32's. The
    dequantised export quantises as the run did (meta.json's model_dtype), then decodes in float32."""
    from trainer.model.base import load_base
    from trainer.model.dequantise import dequantised_weight

    adapter = make_checkpoint(tmp_path / "run", "lora.target_modules=[q_proj]")
    meta = json.loads((adapter / "meta.json").read_text())
    (adapter / "meta.json").write_text(json.dumps({**meta, "model_dtype": "bfloat16"}))
    recipe = tiny_recipe("lora.target_modules=[q_proj]")
    weights = load_file(str(export(recipe, ExportOptions(adapter=str(adapter), out=str(tmp_path / "out"),
                                                         dtype="float32")) / "model.safetensors"))
    mlp = "model.layers.1.mlp.up_proj"
    decoded = {}
    for dtype in ("bfloat16", "float32"):
        model, _ = load_base(tiny_recipe(f"model.dtype={dtype}"), torch.device("cpu"))
        decoded[dtype] = dequantised_weight(model.get_submodule(mlp)).float()
    assert not torch.equal(decoded["bfloat16"], decoded["float32"])  # the codes differ: the test can fail
    assert torch.equal(weights[f"{mlp}.weight"], decoded["bfloat16"])


def test_evaluating_a_bf16_runs_adapter_in_float32_warns_that_the_codes_differ(tmp_path, tiny_base, capsys):
    from trainer.evaluation.adapted_model import load_adapted_model

    adapter = make_checkpoint(tmp_path / "run")
    meta = json.loads((adapter / "meta.json").read_text())
    load_adapted_model(tiny_recipe(), adapter, torch.device("cpu"))
    assert "warning" not in capsys.readouterr().err  # no model_dtype: an older checkpoint, nothing to say
    (adapter / "meta.json").write_text(json.dumps({**meta, "model_dtype": "bfloat16"}))
    load_adapted_model(tiny_recipe(), adapter, torch.device("cpu"))
    assert "quantised from bfloat16 weights, here from float32 ones" in capsys.readouterr().err  # not chat's stdout
    load_adapted_model(tiny_recipe("model.dtype=bfloat16"), adapter, torch.device("cpu"))
    assert "warning" not in capsys.readouterr().err
