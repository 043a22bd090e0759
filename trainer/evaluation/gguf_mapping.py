"""What a transformers Llama's tensors and tokenizer become in a GGUF file, by llama.cpp's
conventions (trainer/evaluation/gguf_export.py writes the file):
- tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...), q and k with their rows reordered
  for llama.cpp's rotary embedding (it rotates adjacent pairs, transformers rotates the two halves
  of each head);
- the tokenizer: SentencePiece-style vocabularies (Metaspace + byte fallback, the tiny base; the
  Metaspace alone or alone in a Sequence, as the converted Llama-2 tokenizer has it) as
  `llama` with per-token scores that reproduce the BPE merge order; byte-level BPE (SmolLM2) as
  `gpt2` with its merges; token types, BOS/EOS/UNK/pad ids, whether BOS/EOS are added, and the
  chat template.
What cannot be mapped faithfully is refused with GGUFExportError, naming why.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from trainer.config import Recipe, RecipeError
from trainer.data.chat_templates import own_chat_template
from trainer.data.tokenizer_checks import document_bos

# transformers' Llama layer paths -> llama.cpp's tensor names
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


class GGUFExportError(RecipeError):
    """A model or tokenizer this exporter cannot write faithfully."""


def gguf_tensor_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_PATTERN.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise GGUFExportError(f"no llama.cpp name for tensor {name}")
    return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"


def rope_rows_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows reordered per head from transformers' rotary layout (first half, second half) to
    llama.cpp's (interleaved pairs): row i of half h goes to row 2i + h."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ------------------------------------------------------------------------------ tokenizer


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str | None = None) -> dict:
    """The `tokenizer.*` keys as {GGUFWriter method suffix: value}."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r}: only BPE vocabularies are mapped")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    metaspace = "Metaspace" in json.dumps(spec.get("pre_tokenizer"))
    if byte_level == metaspace:
        raise GGUFExportError("tokenizer is neither byte-level BPE nor SentencePiece-style (Metaspace) BPE")
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(by_id)} tokens, the model's vocabulary {vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # the embedding has rows past the tokenizer (padded vocabulary)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index == tokenizer.unk_token_id and not byte_level:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            byte = model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", token)
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    metadata: dict = {"tokenizer_model": "gpt2" if byte_level else "llama",
                      "tokenizer_pre": pre or (byte_level_pre(spec.get("pre_tokenizer")) if byte_level else "default"),
                      "token_list": tokens, "token_types": [int(t) for t in types]}
    if byte_level:
        metadata["token_merges"] = merges
    else:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest:
        # a token made by the r-th merge scores -r, so it merges in the BPE's order.
        rank = {}
        for position, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), position)
        metadata["token_scores"] = [-float(rank.get(token, len(merges))) for token in tokens]
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                          ("unk_token_id", tokenizer.unk_token_id), ("pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            metadata[key] = int(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a")["input_ids"]
    eos = tokenizer.eos_token_id
    # BOS as training and eval put it before every prompt (a document BOS, whatever the tokenizer adds by
    # itself: the converted Llama-2 tokenizer adds none), not as the tokenizer alone would.
    metadata["add_bos_token"] = document_bos(tokenizer) is not None
    metadata["add_eos_token"] = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    # The converted Llama-2 tokenizer nests its Metaspace in a Sequence: read it there too, or llama.cpp
    # would tokenise "Below" as "Bel" "ow" where training saw "▁Below".
    metadata["add_space_prefix"] = (not byte_level) and _prepends_space(spec.get("pre_tokenizer"))
    chat_template = own_chat_template(tokenizer)  # the default of a tokenizer's several named templates
    if chat_template is not None:
        metadata["chat_template"] = chat_template
    return metadata


def _prepends_space(pre_tokenizer: dict | None) -> bool:
    """Whether a SentencePiece-style tokenizer's Metaspace (alone, or the only step of a Sequence) puts
    "▁" before the text. Another step is refused: llama.cpp's SentencePiece tokenizer splits nothing
    before merging, so it would tokenise text unlike training, silently."""
    steps = (pre_tokenizer or {}).get("pretokenizers", []) if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer]
    others = [str((step or {}).get("type")) for step in steps if (step or {}).get("type") != "Metaspace"]
    if others:
        raise GGUFExportError(f"the tokenizer's pre-tokenizer splits text with {', '.join(others)} besides Metaspace, "
                              f"which llama.cpp's SentencePiece tokenizer does not do: export to a directory "
                              f"(out=<dir>) instead")
    metaspace = steps[0]
    # tokenizers before 0.19 wrote add_prefix_space instead of prepend_scheme
    scheme = metaspace.get("prepend_scheme") or ("always" if metaspace.get("add_prefix_space", True) else "never")
    return scheme in ("first", "always")


# Byte-level pre-tokenizers as tokenizer.json writes them, by the name llama.cpp knows each by
# (tokenizer.ggml.pre: it splits text with its own copy of the named regexes, not with the file's).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_PRE = {
    (("ByteLevel", (True, False)),): "gpt-2",  # GPT-2's regex inside ByteLevel (use_regex, no prefix space)
    (("Digits", True), ("ByteLevel", (True, False))): "smollm",  # each digit apart, then GPT-2's (SmolLM, StarCoder)
    (("Split", _LLAMA3), ("ByteLevel", (False, False))): "llama-bpe",  # Llama 3
    (("Split", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")), ("ByteLevel", (False, False))): "qwen2",  # Qwen2: digits apart
}


def byte_level_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (tokenizer.json's `pre_tokenizer`).
    One it has no name for here is refused: under a wrong name llama.cpp splits text differently from
    training, silently."""
    steps = pre_tokenizer.get("pretokenizers", []) if (pre_tokenizer or {}).get("type") == "Sequence" else [pre_tokenizer]
    shape = []
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel":
            shape.append((kind, (step.get("use_regex", True), step.get("add_prefix_space", False))))
        elif kind == "Digits":
            shape.append((kind, step.get("individual_digits", False)))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append((kind, (step.get("pattern") or {}).get("Regex")))
        else:
            shape.append((kind, json.dumps(step, sort_keys=True)))
    name = BYTE_LEVEL_PRE.get(tuple(shape))
    if name is None:
        raise GGUFExportError(
            f"the tokenizer's pre-tokenizer ({json.dumps(pre_tokenizer)[:200]}) is none of those this export can "
            f"name for llama.cpp ({', '.join(sorted(set(BYTE_LEVEL_PRE.values())))}); export to a directory "
            f"(out=<dir>) and convert it with llama.cpp's convert_hf_to_gguf.py, which knows more")
    return name


def source_tokenizer_pre(recipe: Recipe) -> str | None:
    """`tokenizer.ggml.pre` of the GGUF file the recipe's base was converted from (None for other
    bases): llama.cpp picks its pre-tokenizer by this name, which a transformers tokenizer does
    not record, so GGUF -> fine-tune -> GGUF keeps the original's."""
    from gguf import GGUFReader

    from trainer.model.gguf import smollm2_gguf

    name = recipe.model.name_or_path
    if name.lower().endswith(".gguf"):
        gguf_file = Path(name).expanduser()
    elif name == "builtin:smollm2-135m":
        gguf_file = smollm2_gguf()
    else:
        return None

    field = GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    return None if field is None else field.contents()
