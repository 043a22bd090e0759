"""Merge an adapter into its base and save a plain transformers model (no LoRA, no quantisation).

    python launch/export.py RECIPE adapter=<checkpoint dir> out=<dir> [export.dtype=auto|float32|bfloat16|float16]
        [export.base=dequantised|original] [section.key=value ...]
    python launch/export.py RECIPE adapter=<checkpoint dir> out=<file>.gguf [format=f16|q8_0|f32]

A `.gguf` out (or format=f16|q8_0|f32) writes one GGUF file for llama.cpp and ollama instead
(trainer/evaluation/gguf_export.py, gguf_mapping.py); the merge is the same.

export.base=dequantised (default) loads the base quantised as in training, dequantises every
quantised linear layer (LoRA-wrapped or not) and adds B @ A * scaling: the result computes what
the trained model computed, up to float rounding. export.base=original merges into the
full-precision weights from disk instead: closer to the original base, but not the weights the
adapter was trained against (the quantisation error is back). With quant.bits=16 the two are one.

The merge is done in float32 whatever export.dtype; the result is cast at the end, written with
`save_pretrained` (safetensors) with the tokenizer, and loads with
`AutoModelForCausalLM.from_pretrained(out)` without this project.

Both kinds of export carry the chat template of the prompts the adapter was trained on, as the
checkpoint recorded them (`training_chat_template`), so that a chat client prompts it as training did
(BOS aside: the templates write none; llama.cpp adds it from the GGUF's add_bos_token, a transformers
user before apply_chat_template's tokens).
Whatever the export cannot write (out=, a GGUF architecture or tokenizer) is refused before loading.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from trainer import options
from trainer.evaluation import gguf_export, gguf_mapping
from trainer.evaluation.adapted_model import add_adapter
from trainer.checkpoint.reading import check_adapter, read_meta, resolve_adapter, trained_dtype, trained_recipe
from trainer.checkpoint.saving import follow_umask
from trainer.config import Recipe, RecipeError
from trainer.data.chat_templates import chat_template, own_chat_template
from trainer.data.instruction_templates import TEMPLATES, prompt_pieces
from trainer.model.adapters import lora_layers, ties_adapted_layer
from trainer.model.dequantise import dequantised_linear, is_quantised
from trainer.model.base import DTYPES, compute_dtype, load_base, load_config, load_tokenizer, resolve_base
from trainer.runtime import run_dir


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
    out = Path(opts.out)
    check_out(out, file_type)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(recipe, device) if opts.dtype == "auto" else DTYPES[opts.dtype]
    adapter_dir = resolve_adapter(opts.adapter)
    # Everything that can refuse runs before minutes of loading and merging a base.
    if file_type != "hf":
        config = load_config(recipe, resolve_base(recipe))
        gguf_export.check_architecture(config)
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    if file_type != "hf":
        tokenizer_pre = gguf_mapping.source_tokenizer_pre(recipe)
        gguf_mapping.tokenizer_metadata(tokenizer, config.vocab_size, tokenizer_pre)  # refuses what it cannot map
        if opts.dtype != "auto":
            print(f"note: export.dtype={opts.dtype} is not used for a GGUF file: its tensors are written as {file_type}")
        dtype = torch.float32  # each tensor is cast or quantised to the file type as it is written
    template, note = training_chat_template(tokenizer, trained_prompt_format(recipe, adapter_dir))
    if template != own_chat_template(tokenizer):  # a base's several named templates stay, its default kept
        tokenizer.chat_template = template
    print(note)
    model = load_merged(recipe, adapter_dir, opts.base, device, dtype)
    if file_type != "hf":
        gguf_export.write_gguf(model, tokenizer, out, file_type, tokenizer_pre=tokenizer_pre)
        print(f"exported {opts.adapter} merged into {resolve_base(recipe)} ({opts.base} base) to {out} "
              f"(GGUF, {file_type})")
        return out
    model.config.use_cache = True  # training turned it off; a user of the export generates
    before = _modified_times(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # What the run recorded (chat reads chat_rendered from it: how to write a conversation).
    meta = read_meta(adapter_dir) or {}
    (out / "meta.json").write_text(json.dumps({**meta, "exported_from": str(adapter_dir), "export_base": opts.base},
                                              indent=2))
    _check_plain(out)
    follow_umask(path for path, modified in _modified_times(out).items() if before.get(path) != modified)
    print(f"exported {opts.adapter} merged into {resolve_base(recipe)} ({opts.base} base, {dtype}) to {out}")
    return out


def _modified_times(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.iterdir()} if folder.is_dir() else {}


def check_out(out: Path, file_type: str) -> None:
    """Refuse an out= the export cannot write, before anything is loaded: a model directory that is
    (or lies under) an existing file, a GGUF file that is an existing directory, a place this user
    cannot write (a read-only or another user's folder)."""
    if file_type == "hf" and out.exists() and not out.is_dir():
        raise RecipeError(f"out={out} is an existing file, and a merged model is written as a directory: give "
                          f"out=<directory> (or out=<name>.gguf for one GGUF file)")
    if file_type != "hf" and out.is_dir():
        raise RecipeError(f"out={out} is an existing directory, and a GGUF export is one file: give "
                          f"out=<directory>/<name>.gguf")
    parent = run_dir.nearest_existing(out.parent)
    if parent is not None and not parent.is_dir():
        raise RecipeError(f"out={out} lies under {parent}, an existing file: give an out= outside it")
    if reason := run_dir.unwritable(out if file_type == "hf" else out.parent):
        raise RecipeError(f"out={out}: {reason}; give an out= this user can write to")


# ------------------------------------------------------------------------------ the prompt format


def trained_prompt_format(recipe: Recipe, adapter_dir: Path) -> str:
    """How training wrote prompts, as the checkpoint recorded it (meta.json, recipe.yaml; the recipe's
    where it recorded nothing): "chat" where it rendered chat rows (data.template: chat, or rows in
    chat format, which take the chat template whatever data.template says), else data.template."""
    meta = read_meta(adapter_dir) or {}
    data = (trained_recipe(adapter_dir) or recipe.to_dict()).get("data") or {}
    template = meta.get("template", data.get("template", recipe.data.template))
    formats = [data.get("format"), *(source.get("format") for source in data.get("mixture") or []
                                     if isinstance(source, dict))]
    return "chat" if template == "chat" or meta.get("chat_rendered") or "chat" in formats else template


def training_chat_template(tokenizer, prompt_format: str) -> tuple[str, str]:
    """The chat template an export carries, so that a chat client (llama.cpp, ollama, transformers'
    apply_chat_template) prompts the model as training did, and a line saying which it is.

    chat: the template training rendered with (the base's, or the built-in one where it has none).
    An instruction template, on a base without a chat template: one that renders a single user message
    as that template's prompt. On a base with one, the base's is kept, with a warning: this project
    reads from it whether BOS is a turn marker (SmolLM2's <|im_start|>), which an export must not change."""
    own = own_chat_template(tokenizer)
    if prompt_format == "chat":
        return chat_template(tokenizer)[0], (
            "note: the export keeps the base's chat template, which training rendered conversations with" if own else
            "note: the base has no chat template: the export carries the built-in one that training rendered "
            "conversations with (<|user|> ... <|assistant|>; trainer/data/chat_templates.py BUILTIN_CHAT_TEMPLATE)")
    name = prompt_format if prompt_format in TEMPLATES else f"custom ({prompt_format!r})"
    if own is None:
        return instruction_chat_template(prompt_format), (
            f"note: the adapter was trained on data.template={name} prompts: the export's chat template renders one "
            f"user message as that prompt (the instruction, no input), and refuses a conversation, which training "
            f"never saw")
    where = ("trainer/data/instruction_templates.py TEMPLATES" if prompt_format in TEMPLATES
             else "data.template in the checkpoint's recipe.yaml")
    return own, (f"warning: the adapter was trained on data.template={name} prompts, but the export keeps the base's "
                 f"chat template, which it was not trained on: prompt the exported model with the {name} prompt "
                 f"itself ({where}; what eval and chat do), not through a chat template")


_INSTRUCTION = "\x00instruction\x00"  # stands for the message in the template's pieces


def instruction_chat_template(template: str) -> str:
    """A jinja chat template that renders one user message as `template`'s prompt for an instruction
    with no input: the text training put before the response. It writes no BOS: a SentencePiece
    tokenizer that prepends a space only at the start of the text would tokenise the prompt after a
    written <s> otherwise; llama.cpp adds BOS where training did (the GGUF's add_bos_token)."""
    pieces = prompt_pieces({"instruction": _INSTRUCTION, "input": ""}, template)
    body = "".join("{{ messages[0]['content'] }}" if text == _INSTRUCTION else f"{{{{ {_jinja_string(text)} }}}}"
                   for text, _ in pieces)
    return ("{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
            "{{ raise_exception('this model was fine-tuned on single instruction prompts: give one user message') }}"
            "{% endif %}" + body)


def _jinja_string(text: str) -> str:
    """`text` as a jinja string literal (kept whole, whatever braces or newlines it holds)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


def _check_plain(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out}/config.json still has a quantization_config; the export is not a plain model")


def main(argv: list[str] | None = None) -> None:
    options.main(export, ExportOptions, "export", argv)
