"""What a tokenised example is and how its pieces become one: [document BOS] + pieces + a trained EOS,
labels masked outside the answers, and prompt text cut from its start to fit max_seq_len.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.config import DataConfig
from trainer.data.formats import DataError

IGNORE_INDEX = -100

# What a piece of an example is: trained, masked prompt text the length policy may cut from its
# start, or masked markup that is kept whole. CONTEXT is prompt text cut before any PROMPT piece: an
# instruction row's input, which the model can do without more readily than the instruction that
# says what to do.
ANSWER, PROMPT, CONTEXT, MARKUP = "answer", "prompt", "context", "markup"


@dataclass
class Example:
    """One tokenised row. Token ids are stored as int32 arrays (`array.array`, list-like): 4 bytes a
    token where a list of Python ints takes about 36, which is most of a large dataset's memory."""
    row_id: int
    input_ids: Sequence[int]
    labels: Sequence[int]
    question: int = 0  # leakage.question_id of the row: equal for rows asking the same question

    def __post_init__(self):
        self.input_ids, self.labels = token_array(self.input_ids), token_array(self.labels)


def examples_identity(examples) -> str:
    """A hash of the examples' tokens and labels, in order: what a held-out loss was scored on (a
    checkpoint's trainer_state.json `held_out`), compared by resume and eval before comparing losses."""
    digest = hashlib.sha256()
    for example in examples:
        for values in (example.input_ids, example.labels):
            values = np.asarray(values, dtype=np.int32)
            digest.update(len(values).to_bytes(8, "little") + values.tobytes())
    return digest.hexdigest()[:16]


def token_array(values) -> array:
    """Token ids (a list, an int32 numpy array or an array already) as an int32 `array.array`."""
    if isinstance(values, array) and values.typecode == "i":
        return values
    if hasattr(values, "tobytes"):  # numpy: copy the buffer, no Python ints in between
        packed = array("i")
        packed.frombytes(values.astype("int32", copy=False).tobytes())
        return packed
    return array("i", values)


@dataclass
class EncodedRows:
    """The examples of consecutive rows as flat arrays, as a store appends them."""
    input_ids: np.ndarray  # int32, the examples end to end
    labels: np.ndarray  # int32, likewise
    lengths: np.ndarray  # int64, tokens per example
    row_ids: np.ndarray  # int64
    questions: np.ndarray  # int64, leakage.question_id per example
    instances: np.ndarray  # int32, which of its record's instances (Row.instance)
    outcomes: Counter  # as tokenize_rows counts them


def assemble(tokenizer, pieces: list[tuple[list[int], str]], config: DataConfig,
             where: str, bos: int | None) -> tuple[tuple[list[int], list[int]] | None, str]:
    """[`bos`] + pieces, ending in a trained EOS, fitted to max_seq_len by cutting prompt pieces from
    their start. `bos` is `document_bos(tokenizer)`, computed once by the caller. Returns ((input_ids, labels), "kept" | "truncated"), or (None, why it
    was dropped: the response alone is too long; the response and the text no cut takes (the template's
    own text, BOS) are; or the cut would take all the prompt text, leaving an answer to no question)."""
    head, pieces = _closed(pieces, tokenizer.eos_token_id, bos)
    outcome = "kept"
    excess = len(head) + _length(pieces) - config.max_seq_len
    if excess > 0:
        if config.on_too_long == "error":
            raise DataError(f"{where}: {excess + config.max_seq_len} tokens, over data.max_seq_len="
                            f"{config.max_seq_len} (data.on_too_long: truncate_prompt or drop handle such rows)")
        if config.on_too_long == "drop":
            return None, "dropped: too long"
        had_prompt = _prompt_length(pieces) > 0
        pieces, cut = _cut_prompt(pieces, excess)
        if cut < excess:
            answer = sum(len(piece) for piece, kind in pieces if kind == ANSWER)
            return None, ("dropped: response alone too long" if answer > config.max_seq_len
                          else "dropped: template text + response too long")
        if had_prompt and not _prompt_length(pieces):
            return None, "dropped: prompt cut to nothing"
        outcome = "truncated"
    ids, labels = list(head), [IGNORE_INDEX] * len(head)  # a document BOS is never a target
    for piece, kind in pieces:
        ids += piece
        labels += piece if kind == ANSWER or config.train_on_prompt else [IGNORE_INDEX] * len(piece)
    return (ids, labels), outcome


def _closed(pieces: list[tuple[list[int], str]], eos: int,
            bos: int | None) -> tuple[list[int], list[tuple[list[int], str]]]:
    """The BOS head and the pieces of an example before any cut: the final response ends at its EOS
    (what a template writes after it, a newline, is cut; a missing EOS is added), and BOS comes
    exactly once (a chat template may already write it)."""
    final_ids, _ = pieces[-1]
    if eos in final_ids:
        final_ids = final_ids[:len(final_ids) - final_ids[::-1].index(eos)]
    else:
        final_ids = final_ids + [eos]
    pieces = pieces[:-1] + [(final_ids, ANSWER)]
    head = [bos] if bos is not None and not _starts_with(pieces, bos) else []
    return head, pieces


def _assembled_length(pieces: list[tuple[list[int], str]], eos: int, bos: int | None) -> int:
    head, pieces = _closed(pieces, eos, bos)
    return len(head) + _length(pieces)


def _starts_with(pieces: list[tuple[list[int], str]], token: int) -> bool:
    first_piece = next((piece for piece, _ in pieces if piece), [])
    return first_piece[:1] == [token]


def _cut_prompt(pieces: list[tuple[list[int], str]], excess: int) -> tuple[list[tuple[list[int], str]], int]:
    """Remove up to `excess` tokens from the prompt text, each piece from its start: the context
    pieces first, then the prompt pieces, earliest first within each (markup and answers are kept
    whole). Returns the pieces and how many tokens were removed."""
    cut, kept = 0, list(pieces)
    for cut_kind in (CONTEXT, PROMPT):
        for index, (piece, kind) in enumerate(kept):
            if kind == cut_kind and cut < excess:
                taken = min(len(piece), excess - cut)
                kept[index], cut = (piece[taken:], kind), cut + taken
    return kept, cut


def _prompt_length(pieces: list[tuple[list[int], str]]) -> int:
    return sum(len(piece) for piece, kind in pieces if kind in (PROMPT, CONTEXT))


def _length(tokenised: list[tuple[list[int], str]]) -> int:
    return sum(len(piece) for piece, _ in tokenised)
