"""What examples need of a tokenizer: an EOS to end every response with, a pad distinct from it, and a
BOS known to be either a document start or a turn marker.

A tokenizer's BOS is a document start (Llama's <s>) unless its chat template writes the BOS token
as a turn marker (ChatML bases such as SmolLM2, whose BOS is <|im_start|>): then no BOS is
prepended, and chat examples start with the template's own first token.
"""
from __future__ import annotations

from trainer.data.chat_templates import _render, chat_template, own_chat_template
from trainer.data.formats import DataError


def check_tokenizer(tokenizer) -> list[str]:
    """Refuse a tokenizer that cannot mark the end of a response; give one a pad distinct from EOS.
    Returns notes for the stats."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: responses cannot end in one, so the model "
                        "would never learn to stop")
    notes = []
    replaced = choose_pad(tokenizer)
    if replaced is not None:
        notes.append(replaced)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(f"the tokenizer's pad token is {_pad_was(tokenizer)} and it has no unk token to pad "
                        f"with: add a distinct pad token (trainer.model.base.load_tokenizer adds <pad>)")
    if tokenizer.bos_token_id is None:
        notes.append("the tokenizer has no BOS token: examples start without one")
    elif document_bos(tokenizer) is None:
        notes.append(f"BOS {tokenizer.bos_token!r} is the chat template's turn marker: not prepended to examples")
    return notes


def choose_pad(tokenizer) -> str | None:
    """The one pad rule: a pad that is missing or equal to EOS becomes the unk token when there is a
    distinct one (SmolLM2's config pads with EOS; its unk is <|endoftext|>). Padding with EOS would
    hide EOS wherever padding is masked, and the model would never learn to stop. Returns a note
    when the pad changed, None when it was fine or nothing could replace it."""
    eos, pad, unk = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id
    if pad is not None and pad != eos:
        return None
    if unk is None or unk == eos:
        return None
    was = _pad_was(tokenizer)
    tokenizer.pad_token = tokenizer.unk_token
    return f"pad token was {was}: padding with {tokenizer.unk_token!r} (id {unk}) instead"


def _pad_was(tokenizer) -> str:
    return "missing" if tokenizer.pad_token_id is None else f"EOS ({tokenizer.eos_token!r})"


def document_bos(tokenizer) -> int | None:
    """The BOS id to start every example with, or None: the tokenizer has no BOS, or its chat
    template writes the BOS token before every message (ChatML's <|im_start|>), so it is a turn
    marker and an instruction-template example must not start with one."""
    bos = tokenizer.bos_token_id
    template = None if bos is None else own_chat_template(tokenizer)
    if template is None:
        return bos
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about its BOS
        return bos
    # A turn marker opens every message, whatever its role. Llama-2-chat writes <s> before each user
    # turn only (and a template may write it once more at the start): it is still a document BOS.
    return None if rendered.count(tokenizer.bos_token) >= len(probe) else bos


def expected_first_token(tokenizer, use_chat: bool) -> tuple[int | None, str]:
    """The token every example must start with, and what it is called in a message: the document
    BOS, or for chat examples under a turn-marker BOS the template's opening token."""
    bos = document_bos(tokenizer)
    if bos is not None or not use_chat or tokenizer.bos_token_id is None:
        return bos, f"exactly one BOS (id {bos})"
    template = chat_template(tokenizer)[0]
    opening = _render(tokenizer, template, [{"role": "user", "content": "a"}], generation_prompt=True)
    first = (tokenizer(opening, add_special_tokens=False)["input_ids"] or [None])[0]
    return first, f"the chat template's opening token (id {first}): the conversation's markup was cut"
