"""A merged Llama-family model written as one GGUF file, for llama.cpp, ollama and anything else
that reads GGUF.

    python launch/export.py RECIPE adapter=DIR out=model.gguf            # f16 (the suffix picks GGUF)
    python launch/export.py RECIPE adapter=DIR out=model.gguf format=q8_0

The `gguf` package writes the container; what goes in it follows llama.cpp's conventions. Decided
here:
- one-dimensional tensors (the norms) in float32 whatever the file type; every matrix in f32, f16
  or q8_0 (q8_0 needs rows that split into blocks of 32; a matrix whose rows do not stays f16); no
  `output.weight` when the embeddings are tied;
- the architecture (`llama.*` keys) from the transformers config.
The tensors' names, q/k row order and the tokenizer keys come from trainer/evaluation/gguf_mapping.py.
transformers' own GGUF reader (`from_pretrained(dir, gguf_file=...)`) reads the file back, and the
tests compare its logits and its tokenizer with the merged model's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.evaluation.gguf_mapping import (GGUFExportError, gguf_tensor_name, rope_rows_for_llama_cpp,
                                            tokenizer_metadata)

FORMATS = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block (one f16 scale + 32 int8)


def output_format(out: str, given: str) -> str:
    """`hf` (a transformers directory) or a GGUF file type, from `format=` or the suffix of `out`."""
    if given not in ("auto", "hf", *FORMATS):
        raise GGUFExportError(f"format must be auto, hf, {', '.join(FORMATS)}; got {given!r}")
    is_file = out.lower().endswith(".gguf")
    if given == "auto":
        return "f16" if is_file else "hf"
    if (given == "hf") == is_file:
        raise GGUFExportError(f"format={given} but out={out}: a GGUF format writes a .gguf file, hf a directory")
    return given


def write_gguf(model: nn.Module, tokenizer, path: Path, file_type: str = "f16", name: str = "",
               tokenizer_pre: str | None = None) -> Path:
    """Write `model` (a plain, unquantised transformers Llama) and `tokenizer` to `path`."""
    import gguf

    if file_type not in FORMATS:
        raise GGUFExportError(f"GGUF file type must be one of {', '.join(FORMATS)}; got {file_type!r}")
    config = model.config
    check_architecture(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(staging, "llama")
    writer.add_name(name or path.stem)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    if file_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(writer, config)
    for key, value in tokenizer_metadata(tokenizer, config.vocab_size, tokenizer_pre).items():
        getattr(writer, f"add_{key}")(value)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        weight = tensor.detach().to("cpu", torch.float32).numpy()
        if ".self_attn.q_proj." in hf_name:
            weight = rope_rows_for_llama_cpp(weight, heads)
        elif ".self_attn.k_proj." in hf_name:
            weight = rope_rows_for_llama_cpp(weight, kv_heads)
        _add_tensor(writer, gguf_tensor_name(hf_name), weight, file_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:  # a full disk, Ctrl-C: no half-written file is left behind
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    writer.close()
    staging.replace(path)  # a reader never sees a half-written file
    return path


def _add_tensor(writer, name: str, weight: np.ndarray, file_type: str) -> None:
    import gguf

    if weight.ndim == 1 or file_type == "f32":
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
    elif file_type == "q8_0" and weight.shape[-1] % Q8_BLOCK == 0:
        packed = gguf.quants.quantize(np.ascontiguousarray(weight), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float16))


def check_architecture(config) -> None:
    """Refuse what the llama GGUF layout cannot hold (export() asks before loading the base)."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type {config.model_type!r} (only llama is mapped)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases in attention or MLP")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}")
    if _rope(config).get("rope_type", "default") != "default":
        problems.append(f"rope scaling {_rope(config)}")
    if problems:
        raise GGUFExportError("cannot write this model as llama GGUF: " + "; ".join(problems))


def _rope(config) -> dict:
    parameters = getattr(config, "rope_parameters", None) or {}
    if not parameters and getattr(config, "rope_theta", None) is not None:  # transformers 4
        parameters = {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {})}
    return parameters


def _add_architecture(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
