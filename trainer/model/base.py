"""The frozen base: loaded through transformers' `from_pretrained`, quantised by bitsandbytes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from trainer import builtin
from trainer.config import Recipe
from trainer.data.tokenizer_checks import choose_pad
from trainer.model.base_fixes import exact_int8_off_gpu, keep_4bit_layout, own_weights, quiet_int8_cast_warning

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The base model or tokenizer could not be found or loaded."""


def compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU (bf16 backward there is ~100x slower than fp32); on a GPU bf16 where it
    computes bf16 natively (Ampere and later), else fp16 (V100, T4: loss-scaled by DeepSpeed)."""
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def quantization_config(recipe: Recipe, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    quant = recipe.quant
    if quant.bits == 16:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = quant.quant_storage
    if storage == "auto":
        # ZeRO-3 shards parameters by dtype; 4-bit weights stored as uint8 cannot be partitioned
        # alongside the compute-dtype ones, so store them in the model's dtype there.
        storage = dtype_name(dtype) if recipe.deepspeed.zero_stage == 3 else "uint8"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype if quant.compute_dtype == "auto" else DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=storage,
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_base(recipe: Recipe) -> str:
    """The base's local directory or hub id: built-ins are built and GGUF files converted on first use."""
    from trainer.model.gguf import GGUFError

    try:
        return builtin.resolve(recipe.model.name_or_path)
    except builtin.UnknownBuiltinError as error:
        raise ModelLoadError(f"model.name_or_path: {error}") from None
    except GGUFError as error:
        raise ModelLoadError(str(error)) from None


def load_tokenizer(name_or_path: str, recipe: Recipe):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_not_found_message("tokenizer", name_or_path, error)) from error
    choose_pad(tokenizer)  # the unk token, where the pad is missing or EOS (SmolLM2's config pads with EOS)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # No unk either (Llama 3): a special token the vocabulary keeps spare, else a new token (the
        # base's embedding must then have room for it).
        tokenizer.add_special_tokens({"pad_token": spare_special_token(tokenizer) or "<pad>"})
    return tokenizer


def spare_special_token(tokenizer) -> str | None:
    """A special token of the vocabulary that nothing else uses, to pad with: one named for padding
    (Llama 3.1's <|finetune_right_pad_id|>), else the first reserved one (Llama 3's
    <|reserved_special_token_0|>); None where there is neither. Never BOS, EOS, unk or a token the chat
    template writes."""
    used = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}
    template = getattr(tokenizer, "chat_template", None)
    # Several named templates (a dict): a token any of them writes is not spare.
    template = "".join(template.values()) if isinstance(template, dict) else template if isinstance(template, str) else ""
    spare = [token.content for _, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
             if token.special and token.content not in used and token.content not in template]
    for word in ("pad", "reserved"):
        named = [content for content in spare if word in content.lower()]
        if named:
            return named[0]
    return None


def check_embedding_rows(tokenizer, rows: int) -> None:
    """Every token the tokenizer can give needs a row of the base's embedding."""
    if len(tokenizer) <= rows:
        return
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= rows:
        why = (f"the base's tokenizer has no pad token apart from EOS, no unk and no spare special token to pad "
               f"with, and the new one ({tokenizer.pad_token!r}) has no embedding row. Give the base's tokenizer "
               f"a pad token it has a row for (its tokenizer_config.json: pad_token)")
    else:
        why = ("the tokenizer is not the base's, or the base's embedding was cut below its vocabulary: load the "
               "tokenizer saved with the base (model.name_or_path names both)")
    raise ModelLoadError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows}: {why}")


def load_config(recipe: Recipe, name_or_path: str):
    """The base's config alone (no weights), with the clear error load_base would give."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, revision=recipe.model.revision,
                                          trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_not_found_message("model", name_or_path, error)) from error


def load_base(recipe: Recipe, device: torch.device) -> tuple[nn.Module, torch.dtype]:
    """Load the base frozen and quantised per the recipe. Returns the model and its compute dtype."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(recipe, device)
    name_or_path = resolve_base(recipe)
    quant = quantization_config(recipe, dtype)
    prequantized = prequantized_config(recipe, name_or_path, quant)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            config=prequantized,  # None: transformers reads it
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=None if prequantized is not None else quant,
            dtype=dtype,
            attn_implementation=recipe.model.attn_implementation,
            device_map={"": device},
        )
    except (OSError, ValueError, ImportError) as error:
        if (message := _attention_message(recipe, error)) is not None:
            raise ModelLoadError(message) from error
        if isinstance(error, ImportError):
            raise
        raise ModelLoadError(_not_found_message("model", name_or_path, error)) from error
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if device.type == "cpu":
        own_weights(model)
    keep_4bit_layout(model)
    if recipe.quant.bits == 8:
        quiet_int8_cast_warning()
        exact_int8_off_gpu(model, device)
    return model, dtype


def prequantized_config(recipe: Recipe, name_or_path: str, wanted):
    """The base's config where its checkpoint is already quantised by bitsandbytes (a hub "-bnb-4bit"
    model: config.json holds a quantization_config), set to compute in the recipe's dtype; None where
    the checkpoint is not quantised.

    transformers loads such a checkpoint as it was saved whatever quantization_config it is given
    (`wanted`, the recipe's): quant.bits=8 would train a 4-bit base that the run's records call 8-bit,
    and quant.bits=16 fails on the packed weights. So one quantised otherwise than the recipe asks is
    refused, saying which settings match it."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    config = load_config(recipe, name_or_path)
    holder = config if getattr(config, "quantization_config", None) else config.get_text_config(decoder=True)
    saved = getattr(holder, "quantization_config", None)
    if not saved:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    try:
        if not AutoHfQuantizer.supports_quant_method(saved):
            return None  # a method transformers does not know: it loads the weights as they are, and so do we
    except ValueError:
        return None  # no method named: from_pretrained says so, as for any unreadable config
    if not (saved.get("load_in_4bit") or saved.get("load_in_8bit")):
        raise ModelLoadError(
            f"the base {name_or_path!r} is already quantised with {saved.get('quant_method')} (its config.json's "
            f"quantization_config); this trainer quantises with bitsandbytes and loads only bitsandbytes "
            f"checkpoints: point model.name_or_path at the unquantised original")
    checkpoint = BitsAndBytesConfig.from_dict(saved)
    if _quant_key(checkpoint) != _quant_key(wanted):
        with_storage = wanted is not None and _quant_key(checkpoint)[:3] == _quant_key(wanted)[:3]
        raise ModelLoadError(
            f"the base {name_or_path!r} is already quantised by bitsandbytes (its config.json's "
            f"quantization_config): {_describe(checkpoint)}. It loads only as it was saved, and the recipe asks "
            f"for {_describe(wanted)}: set {_settings(checkpoint, with_storage)} to train on it as it is, or "
            f"point model.name_or_path at the unquantised original")
    if checkpoint.load_in_4bit:
        # The products in the recipe's dtype, as for a base it quantises itself; the file's only records
        # what its saver computed in (bf16 on a GPU: ~100x slower backward on a CPU).
        saved["bnb_4bit_compute_dtype"] = dtype_name(wanted.bnb_4bit_compute_dtype)
    holder.quantization_config = saved
    return config


def _quant_key(quant) -> tuple:
    if quant is None:
        return (16,)
    if quant.load_in_8bit:
        return (8,)
    return (4, quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant, dtype_name(quant.bnb_4bit_quant_storage))


def _describe(quant) -> str:
    bits, *four_bit = _quant_key(quant)
    if bits != 4:
        return {16: "16-bit (no quantisation)", 8: "8-bit (LLM.int8)"}[bits]
    quant_type, double_quant, storage = four_bit
    return f"4-bit {quant_type}{' with double quant' if double_quant else ''}, stored as {storage}"


def _settings(quant, with_storage: bool) -> str:
    bits, *four_bit = _quant_key(quant)
    if bits == 8:
        return "quant.bits=8"
    quant_type, double_quant, storage = four_bit
    return (f"quant.bits=4 quant.quant_type={quant_type} quant.double_quant={str(double_quant).lower()}"
            + (f" quant.quant_storage={storage}" if with_storage or storage != "uint8" else ""))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations.

    Non-reentrant: the frozen base's inputs never require grad, and reentrant checkpointing would
    then return no gradient for the adapters inside the layer (silently training nothing). So the
    embedding's output need not require grad, which transformers turns on with checkpointing for every
    model fed input_ids (reentrant checkpointing needs it): it would add the first layer's input
    gradient, which nothing uses, to every step."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def _attention_message(recipe: Recipe, error: Exception) -> str | None:
    """The message for a load error that model.attn_implementation caused (flash_attention_2 without its
    package, a hub kernel not trusted): it names that setting, not the base's path. None for other errors."""
    text = str(error).strip()
    hub_kernel = "/" in recipe.model.attn_implementation  # org/repo: its errors speak of kernels
    pattern = r"attn_implementation|flash ?attention|flex_?attention|scaled_dot_product|sdpa" + (r"|kernel" if hub_kernel else "")
    if not text or not re.search(pattern, text, re.IGNORECASE):
        return None
    return (f"model.attn_implementation={recipe.model.attn_implementation} cannot be used here: "
            f"{text.splitlines()[0]}\nInstall what it needs, or set model.attn_implementation=sdpa (the default) or eager.")


def _not_found_message(what: str, name_or_path: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        return (f"could not load the {what}: the local directory {name_or_path!r} does not exist.\n"
                f"Point model.name_or_path at a directory with config.json, *.safetensors and the tokenizer "
                f"files, or at a hub id.")
    where = "a local directory" if looks_local else "the Hugging Face hub (or its local cache)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"could not load the {what} {name_or_path!r} from {where}: {first_line}\n"
            f"Point model.name_or_path at a local copy (a directory with config.json and *.safetensors), "
            f"e.g. `model.name_or_path=/models/llama-2-7b`"
            + (" (HF_HUB_OFFLINE=1 is set, so the hub was not asked)." if offline else "."))
