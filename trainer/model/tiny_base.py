"""The built-in tiny base (`builtin:tiny-llama`): a randomly initialised 4-layer Llama with a
SentencePiece tokenizer trained on the built-in tasks, built once into the cache. It lets every
recipe, test and benchmark run with no network and no model hub."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.data.instruction_templates import TEMPLATES
from trainer.data.tasks import SEED, demo_rows
from trainer.runtime.cache import build_once, cache_dir

# Bump when what gets built changes: a model built by another version is then refused, not reused.
BUILD_VERSION = 2
MARKER = "builtin-complete.json"
# The Alpaca prompts the tokenizer is trained on: with and without an input.
PROMPT_WITH_INPUT, PROMPT_NO_INPUT = TEMPLATES["alpaca"]
DEFAULT_SIZE = {
    "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
}
TOKENIZER_VOCAB = 1000  # SentencePiece pieces; the added <pad> comes on top


def ensure_tiny_base(name: str = "tiny-llama", **size: int) -> Path:
    """Build a randomly initialised Llama plus its tokenizer into cache_dir()/models/<name> once.

    `size` overrides DEFAULT_SIZE keys (tests build a smaller one under another name)."""
    unknown = set(size) - set(DEFAULT_SIZE)
    if unknown:
        raise TypeError(f"unknown size arguments {sorted(unknown)}; allowed: {sorted(DEFAULT_SIZE)}")
    spec = {"version": BUILD_VERSION, "size": {**DEFAULT_SIZE, **size}}
    # The build version is part of the path: a cache from an older generator is never reused.
    final = cache_dir() / "models" / f"{name}-v{BUILD_VERSION}"
    built = build_once(final, f"model-{name}", lambda: (final / MARKER).exists(),
                       lambda staging: _build_tiny_base(staging, spec["size"]), MARKER, spec,
                       f"building the built-in tiny Llama base into {final} (first use)")
    return _checked(built, spec)


def _checked(directory: Path, spec: dict) -> Path:
    # Reusing a name with other sizes (or after a generator change) must not hand back the wrong model.
    built = json.loads((directory / MARKER).read_text())
    if built != spec:
        raise ValueError(f"{directory} was built as {built}, not {spec}; "
                         "use another name or delete that directory to rebuild it")
    return directory


def _tokenizer_corpus() -> list[str]:
    rows = demo_rows()
    texts = [(PROMPT_WITH_INPUT if row["input"] else PROMPT_NO_INPUT).format(**row) + row["output"] for row in rows]
    texts += [PROMPT_WITH_INPUT, PROMPT_NO_INPUT]
    # One sentence per line keeps "\n" out of every learned piece: it always encodes as the byte
    # token <0x0A>, so the prompt's tokens end exactly at "### Response:\n" and never merge into
    # the answer. Each line also gets SentencePiece's leading "▁", matching how a response
    # tokenised on its own starts.
    return [line for text in texts for line in text.split("\n") if line]


def _build_tiny_base(directory: Path, size: dict[str, int]) -> None:
    # Imported here so reading data or resolving paths does not pay for torch and transformers.
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    corpus = _tokenizer_corpus()
    sentencepiece.set_random_generator_seed(SEED)
    with open(directory / "tokenizer.model", "wb") as model_file:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model_file, model_type="bpe",
            vocab_size=TOKENIZER_VOCAB, byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # identity + kept whitespace: the template's "\n\n" and spacing must survive a round trip
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            input_sentence_size=len(corpus), shuffle_input_sentence=False, num_threads=2, minloglevel=2,
        )
    # transformers 5 ignores LlamaTokenizer(vocab_file=...) (the result encodes everything to []);
    # from_pretrained on a folder holding only tokenizer.model is what converts the SentencePiece model.
    tokenizer = LlamaTokenizer.from_pretrained(
        directory, legacy=False, add_bos_token=True, add_eos_token=False,
        model_max_length=size["max_position_embeddings"])
    # A pad distinct from EOS, so masking padding never hides the EOS the model must learn to emit.
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    _check_tokenizer(tokenizer)
    tokenizer.save_pretrained(directory)

    config = LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size)
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        # The output head must be able to produce confident logits: with the default init (std 0.02)
        # and RMS-normalised hidden states, a frozen random head caps every logit gap near 2.5 and
        # no adapter could push the loss much below ln(vocab) - 2.5. Unit-norm rows remove that cap.
        torch.nn.init.normal_(model.lm_head.weight, std=config.hidden_size ** -0.5)
    model.save_pretrained(directory)  # safetensors, the only format transformers 5 writes


def _check_tokenizer(tokenizer) -> None:
    # Conversion from SentencePiece has changed silently between transformers releases; fail loudly.
    sample = PROMPT_WITH_INPUT.format(instruction="Add the two numbers.", input="7 + 12") + "19"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if not ids or tokenizer.decode(ids) != sample or special[:3] != (0, 1, 2) or special[3] in (None, 2):
        raise RuntimeError(f"built-in tokenizer is broken: {len(ids)} ids decode to {tokenizer.decode(ids)!r}, "
                           f"special ids (unk, bos, eos, pad) are {special}")
