"""Rows -> token ids with labels: each row's pieces, from its instruction template or its chat template,
tokenised, then laid out as an example with BOS and EOS and fitted to max_seq_len.

Every example is [document BOS] + text pieces, each piece tokenised on its own and either trained
(the response, or an assistant turn plus its end-of-turn), masked prompt text that the length
policy may cut (an instruction, a row's input, a user turn's content), or masked markup that is
never cut (an instruction template's own text, a chat template's turn headers, its default system
prompt). Tokenising the pieces apart makes the mask boundary exact, and cutting only prompt text
keeps a truncated prompt well formed.
Every example ends in a trained EOS. A row's own text is tokenised literally: a special token's
string in it (an answer that writes "<|im_end|>" or "</s>") is text, never the control token that the
markup writes (which would train the model to stop there).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import chain

import numpy as np

from trainer.config import DataConfig
from trainer.data.chat_templates import (Literal, TemplateRefused, as_messages, chat_pieces, chat_template,
                                         special_pattern)
from trainer.data.examples import (ANSWER, MARKUP, PROMPT, EncodedRows, Example, _assembled_length, _cut_prompt,
                                   _length, _starts_with, assemble)
from trainer.data.formats import DataError, Row
from trainer.data.instruction_templates import prompt_pieces
from trainer.data.leakage import question_id
from trainer.data.tokenizer_checks import document_bos


def tokenize_rows(tokenizer, rows: list[Row], format: str, config: DataConfig,
                  name: str = "data") -> tuple[list[Example], Counter]:
    """Examples, and counts of rows cut or dropped by the length policy (or refused by the chat
    template, with on_bad_row=skip). `name` is the dataset, for messages."""
    counts: Counter = Counter()
    examples = [Example(row.record, *encoded) for row, *encoded in _encoded(tokenizer, rows, format, config, name, counts)]
    return examples, counts


def encode_rows(tokenizer, rows: list[Row], format: str, config: DataConfig, name: str = "data") -> EncodedRows:
    """`tokenize_rows` as flat arrays, with no Example objects in between."""
    counts: Counter = Counter()
    encoded = list(_encoded(tokenizer, rows, format, config, name, counts))
    lengths = np.array([len(ids) for _, ids, *_ in encoded], dtype=np.int64)
    total = int(lengths.sum())
    return EncodedRows(
        input_ids=np.fromiter(chain.from_iterable(ids for _, ids, *_ in encoded), np.int32, count=total),
        labels=np.fromiter(chain.from_iterable(labels for _, _, labels, *_ in encoded), np.int32, count=total),
        lengths=lengths, row_ids=np.array([row.record for row, *_ in encoded], dtype=np.int64),
        questions=np.array([question for *_, question in encoded], dtype=np.int64),
        instances=np.array([row.instance for row, *_ in encoded], dtype=np.int32), outcomes=counts)


def _encoded(tokenizer, rows: list[Row], format: str, config: DataConfig, name: str,
             counts: Counter) -> Iterator[tuple[Row, list[int], list[int], int]]:
    """(row, input ids, labels, question id) per kept row; outcomes other than kept go to `counts`."""
    use_chat = format == "chat" or config.template == "chat"
    pieces: list[list[tuple[str, str]] | None] = []
    for row in rows:
        try:
            pieces.append(row_pieces(tokenizer, row.fields, config.template, use_chat))
        except TemplateRefused as error:
            if config.on_bad_row != "skip":
                raise DataError(f"{name}: {row.where}: {error}") from None
            counts["skipped: refused by the chat template"] += 1
            pieces.append(None)
        except DataError as error:
            raise DataError(f"{name}: {row.where}: {error}") from None
    # Each row's masked text between answers is tokenised as one piece, as it is rendered; only a
    # row over max_seq_len is tokenised again piece by piece, so that its cut can spare the markup.
    # A chat row whose own text holds a special token's string is tokenised piece by piece at once.
    coarse = [None if not one_row or (use_chat and _writes_special(tokenizer, one_row)) else _joined(one_row)
              for one_row in pieces]
    ids = _token_ids(tokenizer, [text for one_row in coarse if one_row for text, _ in one_row], literal=not use_chat)
    bos, eos = document_bos(tokenizer), tokenizer.eos_token_id  # document_bos renders the template: once
    for row, one_row, joined in zip(rows, pieces, coarse):
        if one_row is None:
            continue
        if joined is None:
            tokenised = _tokenised_apart(tokenizer, one_row, use_chat)
        else:
            tokenised = [(next(ids), kind) for _, kind in joined]
        # Measured as assemble lays the example out (the EOS it appends or the tail it trims, and
        # the BOS unless the template wrote it), so that any row assemble must cut has fine pieces.
        if joined is not None and len(joined) < len(one_row) and _assembled_length(tokenised, eos, bos) > config.max_seq_len:
            tokenised = _tokenised_apart(tokenizer, one_row, use_chat)
        example, outcome = assemble(tokenizer, tokenised, config, f"{name}: {row.where}", bos)
        if outcome != "kept":
            counts[outcome] += 1
        if example is not None:
            yield row, *example, question_id(row.fields)


def _joined(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive masked pieces as one (prompt, unless all markup)."""
    joined: list[tuple[str, str]] = []
    for text, kind in pieces:
        if joined and kind != ANSWER and joined[-1][1] != ANSWER:
            previous, previous_kind = joined[-1]
            joined[-1] = (previous + text, MARKUP if previous_kind == kind == MARKUP else PROMPT)
        else:
            joined.append((text, kind))
    return joined


def row_pieces(tokenizer, fields: dict, template: str, use_chat: bool) -> list[tuple[str, str]]:
    """A row as (text, kind) pieces: the rendered conversation for chat rows or data.template=chat,
    else the instruction template's prompt pieces and the response."""
    if use_chat:
        messages = fields["messages"] if "messages" in fields else as_messages(fields)
        return chat_pieces(tokenizer, chat_template(tokenizer)[0], messages)
    return [*prompt_pieces(fields, template), (fields["output"], ANSWER)]


def prompt_tokens(tokenizer, fields: dict, template: str, max_tokens: int | None = None) -> list[int]:
    """The tokens training puts before the (first) response, for generation: the same pieces,
    tokenised the same way, with a document BOS, and cut by the same rule when longer than
    `max_tokens` (prompt text from its start, the input before the instruction, never the template's
    markup; the markup alone is kept)."""
    use_chat = "messages" in fields or template == "chat"
    pieces = row_pieces(tokenizer, fields, template, use_chat)
    return _prompt_ids(tokenizer, pieces[:next(i for i, (_, kind) in enumerate(pieces) if kind == ANSWER)], use_chat,
                       max_tokens)


def conversation_tokens(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokens before the next assistant turn of a conversation that ends in a user message, as
    training tokenises such a row under the chat template (the earlier answers each on their own, a
    message's special-token strings as text)."""
    pieces = chat_pieces(tokenizer, chat_template(tokenizer)[0], [*messages, {"role": "assistant", "content": ""}])
    return _prompt_ids(tokenizer, pieces[:max(i for i, (_, kind) in enumerate(pieces) if kind == ANSWER)], True)


def _prompt_ids(tokenizer, prompt: list[tuple[str, str]], use_chat: bool, max_tokens: int | None = None) -> list[int]:
    bos = document_bos(tokenizer)
    tokenised = []
    # The whole prompt at once unless it must be cut, or holds a special token's string as text.
    candidates = (prompt,) if _writes_special(tokenizer, prompt) else (_joined(prompt), prompt)
    for candidate in candidates:
        tokenised = _tokenised_apart(tokenizer, candidate, use_chat)
        head = [bos] if bos is not None and not _starts_with(tokenised, bos) else []
        excess = len(head) + _length(tokenised) - max_tokens if max_tokens is not None else 0
        if excess <= 0:
            break
    if excess > 0:
        tokenised = _cut_prompt(tokenised, excess)[0]
    return head + [token for piece, _ in tokenised for token in piece]


def _token_ids(tokenizer, texts: list[str], literal: bool, batch: int = 2048):
    """Each text's token ids, tokenised a batch at a time: the Python lists of a whole large dataset
    at once would take ~36 bytes a token before they become compact Examples."""
    backend = _plain_backend(tokenizer)
    for start in range(0, len(texts), batch):
        if backend is None:
            yield from tokenizer(texts[start:start + batch], add_special_tokens=False,
                                 split_special_tokens=literal)["input_ids"]
        else:
            backend.encode_special_tokens = literal  # what split_special_tokens sets
            yield from (encoding.ids for encoding in backend.encode_batch_fast(texts[start:start + batch],
                                                                              add_special_tokens=False))


def _tokenised_apart(tokenizer, pieces: list[tuple[str, str]], use_chat: bool) -> list[tuple[list[int], str]]:
    """Each piece tokenised on its own: with special tokens parsed in chat markup, literally in
    instruction templates and in a chat row's own text (`Literal`). Two batches at most."""
    literal = [not use_chat or isinstance(text, Literal) for text, _ in pieces]
    ids = {flag: _token_ids(tokenizer, [text for (text, _), each in zip(pieces, literal) if each == flag], flag)
           for flag in (True, False)}
    return [(next(ids[each]), kind) for (_, kind), each in zip(pieces, literal)]


def _writes_special(tokenizer, pieces: list[tuple[str, str]]) -> bool:
    """Whether a row's own text (`Literal` pieces) holds a special token's string."""
    literal = [text for text, _ in pieces if isinstance(text, Literal)]
    return bool(literal) and any(special_pattern(tokenizer).search(text) for text in literal)


def _plain_backend(tokenizer):
    """The Rust tokenizer behind `tokenizer` when calling it directly gives exactly the ids that
    `tokenizer(texts, add_special_tokens=False)` gives: a transformers fast tokenizer whose class
    changes nothing on the way, with no truncation or padding set; else None. Its batch encode
    without character offsets takes half the time of transformers' (which converts every encoding)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    kind = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or not hasattr(backend, "encode_batch_fast")
            or kind._encode_plus is not TokenizersBackend._encode_plus
            or kind.__call__ is not PreTrainedTokenizerBase.__call__
            or backend.truncation is not None or backend.padding is not None):
        return None
    return backend
