"""Merge an adapter into its base and save a plain transformers model (no LoRA, no quantisation).

    python launch/export.py RECIPE adapter=<checkpoint dir> out=<dir> [export.dtype=auto|float32|bfloat16|float16]
        [export.base=dequantised|original] [section.key=value ...]
    python launch/export.py RECIPE adapter=<checkpoint dir> out=<file>.gguf [format=f16|q8_0|f32]

A `.gguf` out (or format=f16|q8_0|f32) writes one GGUF file for llama.cpp and ollama instead
(trainer/evaluation/gguf_export.py); the merge is the same.

export.base=dequantised (default) loads the base quantised as in training, dequantises every
quantised linear layer (LoRA-wrapped or not) and adds B @ A * scaling: the result computes what
the trained model computed, up to float rounding. export.base=original merges into the
full-precision weights from disk instead: closer to the original base, but not the weights the
adapter was trained against (the quantisation error is back). With quant.bits=16 the two are one.

The merge is done in float32 whatever export.dtype; the result is cast at the end, written with
`save_pretrained` (safetensors) with the tokenizer, and loads with
`AutoModelForCausalLM.from_pretrained(out)` without this project.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from trainer import options
from trainer.evaluation import gguf_export
from trainer.evaluation.adapted_model import add_adapter
from trainer.checkpoint.reading import check_adapter, read_meta, resolve_adapter, trained_dtype
from trainer.config import Recipe, RecipeError
from trainer.model.lora import dequantised_linear, is_quantised, lora_layers, ties_adapted_layer
from trainer.model.base import DTYPES, compute_dtype, load_base, load_config, load_tokenizer, resolve_base


@dataclass
class ExportOptions:
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("adapter", "out", "format")
    adapter: str = ""  # checkpoint directory
    out: str = ""  # where the merged model goes: a directory, or a .gguf file
    format: str = "auto"  # auto (a .gguf out: f16, else hf) | hf (transformers directory) | f16 | q8_0 | f32 (GGUF)
    dtype: str = "auto"  # auto (the compute dtype: float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    base: str = "dequantised"  # dequantised (what training saw) | original (full-precision weights from disk)


def merge_to_plain(model: nn.Module, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> nn.Module:
    """In place: every LoRA layer merged in float32 and replaced by its base nn.Linear, every other
    quantised linear layer dequantised, the quantisation config removed; the model ends in `dtype`
    on `device`.

    A layer at a time: each is dequantised (on the device the base was loaded on), merged, cast and
    moved to `device` before the next one is dequantised, so at most one float32 layer exists besides
    the quantised model (dequantising every layer first would hold a 7B model in fp32, ~26 GB, on the GPU).

    Tied input and output embeddings with either side adapted are merged into a copy: the other
    side keeps the base weight, as in training, and the saved config says tie_word_embeddings=false
    (so a GGUF export writes output.weight too)."""
    if ties_adapted_layer(model):
        model.config.tie_word_embeddings = False
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        if text_config is not None:
            text_config.tie_word_embeddings = False
    for path in list(lora_layers(model)):
        layer = model.get_submodule(path)
        base = layer.base_layer
        # Dequantise (or upcast) first, so B @ A * scaling is added in float32, never in 4/8/16 bits.
        layer.base_layer = dequantised_linear(base, torch.float32) if is_quantised(base) else base.float()
        layer.merge()
        _replace(model, path, layer.base_layer.to(device=device, dtype=dtype))
        del layer, base
    for path in [path for path, module in model.named_modules() if is_quantised(module)]:
        _replace(model, path, dequantised_linear(model.get_submodule(path), torch.float32).to(device=device, dtype=dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for name in ("_is_quantized", "_pre_quantization_dtype"):
        model.config.__dict__.pop(name, None)
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    return model.to(device=device, dtype=dtype)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def load_merged(recipe: Recipe, adapter_dir: Path, base: str = "dequantised", device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Base + adapter, merged into a plain model on the CPU in `dtype` (merged in float32; see the
    module docstring for `base`). `device`: where the base is loaded and dequantised."""
    if base not in ("dequantised", "original"):
        raise RecipeError(f"export.base must be dequantised or original, got {base!r}")
    device = device or torch.device("cpu")
    for warning in check_adapter(recipe, adapter_dir):
        print(f"warning: {warning}")
    if base == "original":
        recipe = replace(recipe, quant=replace(recipe.quant, bits=16), model=replace(recipe.model, dtype="float32"))
    elif recipe.quant.bits in (4, 8):
        # Quantised from the weights in the dtype training loaded them in (meta.json's model_dtype: a GPU
        # run's bf16 rounds them first, and their 4-bit codes differ from float32's), on any device; then
        # each layer decodes and merges in float32. A checkpoint without it: float32. (A 16-bit base stays
        # in its dtype: merge_to_plain merges each layer in float32.)
        trained = trained_dtype(adapter_dir)
        recipe = replace(recipe, model=replace(recipe.model, dtype=trained if trained in DTYPES else "float32"))
    model, _ = load_base(recipe, device)
    add_adapter(model, adapter_dir)
    return merge_to_plain(model.eval(), dtype)


def export(recipe: Recipe, opts: ExportOptions) -> Path:
    if not opts.adapter or not opts.out:
        raise RecipeError("usage: python launch/export.py RECIPE adapter=<checkpoint dir> out=<dir> "
                          "[export.dtype=auto|float32|bfloat16|float16] [export.base=dequantised|original]")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise RecipeError(f"export.dtype must be auto, {', '.join(DTYPES)}; got {opts.dtype!r}")
    file_type = gguf_export.output_format(opts.out, opts.format)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(recipe, device) if opts.dtype == "auto" else DTYPES[opts.dtype]
    if file_type != "hf":
        # Before minutes of loading and merging a base the file could not hold.
        gguf_export.check_architecture(load_config(recipe, resolve_base(recipe)))
        if opts.dtype != "auto":
            print(f"note: export.dtype={opts.dtype} is not used for a GGUF file: its tensors are written as {file_type}")
        dtype = torch.float32  # each tensor is cast or quantised to the file type as it is written
    adapter_dir = resolve_adapter(opts.adapter)
    model = load_merged(recipe, adapter_dir, opts.base, device, dtype)
    if file_type != "hf":
        gguf_export.write_gguf(model, load_tokenizer(resolve_base(recipe), recipe), Path(opts.out), file_type,
                               tokenizer_pre=gguf_export.source_tokenizer_pre(recipe))
        print(f"exported {opts.adapter} merged into {resolve_base(recipe)} ({opts.base} base) to {opts.out} "
              f"(GGUF, {file_type})")
        return Path(opts.out)
    model.config.use_cache = True  # training turned it off; a user of the export generates
    out = Path(opts.out)
    model.save_pretrained(out)
    load_tokenizer(resolve_base(recipe), recipe).save_pretrained(out)
    # What the run recorded (chat reads chat_rendered from it: how to write a conversation).
    meta = read_meta(adapter_dir) or {}
    (out / "meta.json").write_text(json.dumps({**meta, "exported_from": str(adapter_dir), "export_base": opts.base},
                                              indent=2))
    _check_plain(out)
    print(f"exported {opts.adapter} merged into {resolve_base(recipe)} ({opts.base} base, {dtype}) to {out}")
    return out


def _check_plain(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out}/config.json still has a quantization_config; the export is not a plain model")


def main(argv: list[str] | None = None) -> None:
    options.main(export, ExportOptions, "export", argv)
