"""`trainer.speedups.apply` switches on what the recipe asks and nothing else, and importing the
speed-ups changes nothing in the process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import speedups
from trainer.recipe_loading import recipe_from_dict
from trainer.model.base import load_base
from trainer.model.lora import LoRALinear, apply_lora
from trainer.speedups import dropout_masks, fused, onednn, rotary
from trainer.speedups.packed_attention import PACKED_ATTENTION

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
ALL_OFF = {"train": {"fused_mlp": False, "fused_norm": False, "fused_rotary": False, "onednn_matmul": False},
           "data": {"packing": False}, "lora": {"dropout": 0.0}}


def lora_model(small_base_path: str, settings: dict | None = None):
    settings = settings or {}
    recipe = recipe_from_dict({**settings, "model": {"name_or_path": small_base_path}, "quant": {"bits": 4}})
    model, _ = load_base(recipe, CPU)
    torch.manual_seed(0)
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout)
    return model, recipe


@pytest.fixture
def environ(monkeypatch) -> dict[str, str]:
    """This process's environment as apply() sees it, without oneDNN's cache settings; a copy, so
    what apply() sets reaches neither the other tests nor their subprocesses."""
    copy = {k: v for k, v in os.environ.items() if k not in onednn.CACHE_VARIABLES}
    monkeypatch.setattr(os, "environ", copy)
    return copy


def replaced(module: nn.Module):
    """The function a speed-up bound as `module.forward` (None: the class's own forward)."""
    forward = vars(module).get("forward")
    return getattr(forward, "func", forward)


def modules_named(model: nn.Module, name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == name]


def test_apply_switches_on_what_the_recipe_asks(small_base_path, environ):
    model, recipe = lora_model(small_base_path)  # the defaults: every speed-up on, lora.dropout 0.05
    layers = model.config.num_hidden_layers
    switched = speedups.apply(model, recipe, CPU)
    assert len(switched) == 8, switched
    assert all(replaced(m) is fused._swiglu_forward for m in modules_named(model, "LlamaMLP"))
    norms = modules_named(model, "LlamaRMSNorm")
    assert len(norms) == 2 * layers + 1 and all(replaced(m) is fused._rms_norm_forward for m in norms)
    attentions = modules_named(model, "LlamaAttention")
    assert all(replaced(m) is rotary._llama_attention_forward for m in attentions)
    assert all(vars(m)["forward"].keywords == {"fused_qkv": True} for m in attentions)
    bases = modules_named(model, "Linear4bit")
    assert len(bases) == 7 * layers and all(replaced(m) is onednn._linear4bit_forward for m in bases)
    assert replaced(model.lm_head) is onednn._frozen_linear_forward
    assert model.config._attn_implementation == PACKED_ATTENTION
    assert all(m.blocked_attention for m in attentions) and "blocked products" in " ".join(switched)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert adapters and all(replaced(m) is dropout_masks._masked_forward for m in adapters)
    assert all(replaced(m.lora_A) is dropout_masks._masked_down for m in adapters)
    assert model.model.layers[-1]._trained_positions_hooks is not None
    assert all(environ[name] == str(onednn.CACHE_CAPACITY) for name in onednn.CACHE_VARIABLES)


def test_what_apply_binds_survives_train_and_eval_switches(small_base_path, environ):
    # transformers re-kernelizes a model with hub kernels on at each train()/eval() switch (with the
    # `kernels` package installed), which put LlamaRMSNorm's own forward back over the fused one.
    model, recipe = lora_model(small_base_path)
    speedups.apply(model, recipe, CPU)
    bound = {name: replaced(m) for name, m in model.named_modules() if replaced(m) is not None}
    model.train()
    model.eval()
    model.train()
    assert {name: replaced(m) for name, m in model.named_modules() if replaced(m) is not None} == bound
    assert sum(f is fused._rms_norm_forward for f in bound.values()) == 2 * model.config.num_hidden_layers + 1


def test_apply_switches_nothing_the_recipe_turns_off(small_base_path, environ):
    model, recipe = lora_model(small_base_path, ALL_OFF)
    switched = speedups.apply(model, recipe, CPU)
    # No recipe switch: the last layer at trained positions (exact), oneDNN's cache caps (CPU).
    assert switched == [f"oneDNN caches capped at {onednn.CACHE_CAPACITY} entries",
                        "last layer at trained positions only"]
    assert [name for name, m in model.named_modules() if replaced(m) is not None] == []
    assert model.config._attn_implementation == "sdpa"
    assert all(isinstance(m.lora_dropout, nn.Identity) for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("fused_qkv, zero_stage", [(True, 2), (False, 2), (True, 3)])
def test_q_k_and_v_are_one_product_where_the_adapters_have_no_dropout(small_base_path, environ, fused_qkv, zero_stage):
    model, recipe = lora_model(small_base_path, {"train": {"fused_qkv": fused_qkv}, "lora": {"dropout": 0.0},
                                                 "deepspeed": {"zero_stage": zero_stage}})
    switched = speedups.apply(model, recipe, CPU)
    layers = model.config.num_hidden_layers
    fused = fused_qkv and zero_stage != 3  # ZeRO-3 gathers each layer around its own call
    assert f"fused rotary embedding ({layers} attention layers)" in switched
    assert (f"q, k and v as one product ({layers} attention layers)" in switched) == fused
    assert all(vars(m)["forward"].keywords == ({"fused_qkv": True} if fused else {})
               for m in modules_named(model, "LlamaAttention"))


def test_blocked_attention_follows_the_recipe(small_base_path, environ):
    model, recipe = lora_model(small_base_path, {"train": {"blocked_attention": False}})
    switched = speedups.apply(model, recipe, CPU)
    assert model.config._attn_implementation == PACKED_ATTENTION and "attention per packed example" in switched
    attentions = modules_named(model, "LlamaAttention")
    assert attentions and not any(m.blocked_attention for m in attentions)


def test_evaluation_gets_only_the_onednn_products_and_the_last_layer(small_base_path, environ):
    model, recipe = lora_model(small_base_path)
    switched = speedups.apply(model, recipe, CPU, training=False)
    assert len(switched) == 3, switched
    changed = {type(m).__name__ for m in model.modules() if replaced(m) is not None}
    assert changed == {"Linear4bit", "Linear"}  # the base layers and the vocabulary projection
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[-1]._trained_positions_hooks is not None


def test_off_the_cpu_there_is_no_onednn(small_base_path, environ):
    model, recipe = lora_model(small_base_path)
    switched = speedups.apply(model, recipe, torch.device("cuda"))  # only the device's type is read
    assert not any("oneDNN" in entry or "products" in entry for entry in switched) and len(switched) == 6, switched
    assert replaced(model.lm_head) is None and all(replaced(m) is None for m in modules_named(model, "Linear4bit"))
    assert all(vars(m)["forward"].keywords == {} for m in modules_named(model, "LlamaAttention"))  # no fused q, k, v
    assert not any(name in environ for name in onednn.CACHE_VARIABLES)


def test_a_recipes_own_cache_settings_win(small_base_path, environ):
    environ["LRU_CACHE_CAPACITY"] = "64"
    model, recipe = lora_model(small_base_path, ALL_OFF)
    speedups.apply(model, recipe, CPU)
    assert environ["LRU_CACHE_CAPACITY"] == "64" and environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"


def test_importing_the_speedups_changes_nothing_in_the_process():
    code = """
import os, sys
before = dict(os.environ)
import trainer.speedups, trainer.speedups.malloc
torch_first = "torch" in sys.modules
import trainer.speedups.onednn, trainer.speedups.fused, trainer.speedups.dropout_masks
import trainer.speedups.last_layer, trainer.speedups.packed_attention, trainer.speedups.rotary
from transformers import AttentionInterface
print(torch_first, dict(os.environ) == before, "packed_sdpa" in AttentionInterface._global_mapping)
"""
    env = {k: v for k, v in os.environ.items() if k not in onednn.CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "False"]


@pytest.mark.slow
def test_oneDNN_caches_are_capped_when_apply_runs_after_the_model_is_loaded(small_base_path):
    # oneDNN reads its cache capacities at its first use in the process: loading the base and adding
    # adapters (what the loop does before apply) must not get there first.
    code = f"""
import torch
from trainer import speedups
from trainer.recipe_loading import recipe_from_dict
from trainer.model.base import load_base
from trainer.model.lora import apply_lora
from trainer.speedups import onednn
torch.set_num_threads(1)
recipe = recipe_from_dict({{"model": {{"name_or_path": {small_base_path!r}}}, "quant": {{"bits": 4}}}})
model, _ = load_base(recipe, torch.device("cpu"))
apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout)
speedups.apply(model, recipe, torch.device("cpu"))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
weight = torch.randn(96, 64)
for rows in range(100, 700):
    if rows == 300:
        before = rss()
    onednn.linear(torch.randn(rows, 64), weight)
print(rss() - before)
"""
    if not onednn.available():
        pytest.skip("this torch build has no oneDNN")
    env = {k: v for k, v in os.environ.items() if k not in onednn.CACHE_VARIABLES}

    def growth(extra: dict[str, str]) -> float:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        return float(out.stdout)

    # Against the same run with the libraries' default capacity (a value already in the environment
    # wins over apply's): how much an entry weighs depends on the machine, the ratio does not.
    capped = growth({})
    uncapped = growth(dict.fromkeys(onednn.CACHE_VARIABLES, "1024"))
    assert capped < 0.1 * uncapped, f"RSS grew by {capped:.1f} MB capped, {uncapped:.1f} MB at the defaults"
