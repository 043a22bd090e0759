"""Adapters for tests that need one without a training run: a LoRA checkpoint made directly (the
tiny base, our LoRA with random non-zero B, in the layout trainer/checkpoint/saving.py writes, with
a meta.json carrying the base's fingerprint), loaded back as evaluation loads it or through peft on
an NF4 base; and one torch thread per test process."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from trainer.checkpoint.fingerprint import base_fingerprint
from trainer.checkpoint.best import COMPLETE
from trainer.checkpoint.saving import adapter_config, peft_key
from trainer.config import Recipe
from trainer.recipe_loading import load_recipe
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.model.lora import apply_lora
from trainer.model.lora_embedding import LoRAEmbedding
from trainer.model.base import load_base, resolve_base

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny_alpaca.yaml"


def tiny_recipe(*overrides: str) -> Recipe:
    return load_recipe(RECIPE, list(overrides))


def through_peft(model: torch.nn.Module, recipe: Recipe, base_dir: Path, adapter_dir: Path):
    """`model`'s adapters written to `adapter_dir` as a checkpoint writes them (`recipe`'s adapter
    config), loaded by peft onto the base saved at `base_dir`, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config(recipe, str(base_dir))))
    save_file({peft_key(name): p.detach().clone() for name, p in adapter_parameters(model).items()},
              str(adapter_dir / "adapter_model.safetensors"))
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


def make_checkpoint(directory: Path, *overrides: str, seed: int = 0, b_std: float = 0.05) -> Path:
    """checkpoints/step-1 under `directory` for tiny_alpaca.yaml with `overrides`; returns its path."""
    recipe = tiny_recipe(f"output_dir={directory}", *overrides)
    model, _ = load_base(recipe, torch.device("cpu"))
    torch.manual_seed(seed)
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha, 0.0, recipe.lora.rslora,
               recipe.lora.dora)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if isinstance(layer, LoRAEmbedding):  # its B is the random one; A starts at zero
                layer.lora_embedding_A.normal_(std=b_std)
            else:
                layer.lora_B.weight.normal_(std=b_std)
            if layer.lora_magnitude_vector is not None:  # DoRA: magnitudes away from ||W||
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector))
    base = resolve_base(recipe)
    target = directory / "checkpoints" / "step-1"
    target.mkdir(parents=True)
    weights = {peft_key(name): p.detach().float().clone() for name, p in adapter_parameters(model).items()}
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text(json.dumps(adapter_config(recipe, base), indent=2))
    (target / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    meta = {"step": 1, "base_model": base, "base_fingerprint": base_fingerprint(base),
            "quant_bits": recipe.quant.bits, "template": recipe.data.template, "world_size": 1,
            "zero_stage": recipe.deepspeed.zero_stage}
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    (target / COMPLETE).write_text("")
    return target


def our_model(recipe: Recipe, adapter_dir: Path) -> torch.nn.Module:
    """Base (quantised per the recipe) + our LoRA + the adapter, as evaluation loads it."""
    from trainer.evaluation.adapted_model import add_adapter

    model, _ = load_base(recipe, torch.device("cpu"))
    add_adapter(model, adapter_dir)
    return model.eval()


# On a small shared CPU machine two intra-op threads spin-wait on each other whenever another
# process holds a core, and decoding gets ~100x slower; one thread per process avoids that.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def one_thread():
    """Generator for a fixture: torch on one thread for the tests of a module, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peft_on_4bit_base(base_path, adapter_dir: Path):
    """PeftModel.from_pretrained on the base in bitsandbytes NF4 (fp32 compute), as a user loads our
    adapter, after checking that every adapter weight we saved arrived unchanged (PEFT only warns
    about a missing key, and leaves that B at zero)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.checkpoint import reading
    from trainer.model.base_fixes import keep_4bit_layout

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    # On an AVX512-BF16 CPU, bitsandbytes would repack the 4-bit weights for a bf16 kernel in eval
    # mode (and fails to for the tiny base's shapes): compare in fp32, as our load_base does.
    keep_4bit_layout(base)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = reading.load_adapter_weights(adapter_dir)
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(saved) == set(loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    return peft_model
