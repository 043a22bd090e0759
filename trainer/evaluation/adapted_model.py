"""A trained adapter back on its base, ready to evaluate, export or chat with: the base (quantised
as the recipe says) + our LoRA layers + the adapter's weights, in eval mode."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from trainer import speedups
from trainer.checkpoint.reading import load_into_model, read_adapter_config, trained_dtype
from trainer.config import Recipe
from trainer.model.base import dtype_name, load_base, load_tokenizer, resolve_base
from trainer.model.adapters import adapter_parameters
from trainer.model.lora import apply_lora
from trainer.runtime import distributed


def add_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Wrap the layers the adapter names with our LoRA (no dropout) and load its weights."""
    config = read_adapter_config(adapter_dir)
    apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"], 0.0,
               bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)), strict=False,
               named_in=f"{adapter_dir / 'adapter_config.json'}: target_modules")
    load_into_model(model, adapter_dir)


def load_adapted_model(recipe: Recipe, adapter_dir: Path | None, device: torch.device,
                       tokenizer=None) -> tuple[nn.Module, object, torch.dtype]:
    """Base (quantised as the recipe says) + adapter, in eval mode. `adapter_dir=None`: the base
    alone. Returns the model, the tokenizer (`tokenizer` where the caller loaded it already) and the
    compute dtype. Call `trainer.checkpoint.reading.check_adapter` first."""
    if tokenizer is None:  # else the caller's, loaded for this base
        with distributed.main_first():  # rank 0 builds a built-in base once
            tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    model, dtype = load_base(recipe, device)
    if adapter_dir is not None:
        trained = trained_dtype(adapter_dir)
        if recipe.quant.bits in (4, 8) and trained not in (None, dtype_name(dtype)) and distributed.is_main():
            print(f"warning: the adapter was trained with the base quantised from {trained} weights, here from "
                  f"{dtype_name(dtype)} ones: some {recipe.quant.bits}-bit codes differ, so results move slightly; "
                  f"model.dtype={trained} evaluates the trained model exactly", file=sys.stderr, flush=True)
        add_adapter(model, adapter_dir)
        # Training ran the adapters in the compute dtype (DeepSpeed casts every parameter to bf16/fp16
        # and keeps the fp32 masters in the optimizer): evaluate them as they ran, so the held-out
        # loss is the one training logged. (Export merges the fp32 weights instead.)
        for parameter in adapter_parameters(model).values():
            parameter.data = parameter.data.to(dtype)
    speedups.apply(model, recipe, device, training=False)
    return model.eval(), tokenizer, dtype
