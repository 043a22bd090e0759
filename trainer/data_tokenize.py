"""Rows -> token ids with labels: prompt templates, chat templates rendered turn by turn, BOS and
EOS hygiene, and the length policy.

Every example is BOS + text pieces, each piece tokenised on its own and either trained (the
response, or an assistant turn plus its end-of-turn) or masked with IGNORE_INDEX. Tokenising the
pieces apart makes the mask boundary exact. Every example ends in a trained EOS.
"""
from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.config import DataConfig
from trainer.data_formats import DataError, Row
from trainer.leakage import question_id

IGNORE_INDEX = -100

TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}

# Used when data.template is chat (or rows are chat) and the tokenizer has no chat template.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TemplateRefused(DataError):
    """The chat template raised on one conversation (a row problem, not a template problem)."""


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


def token_array(values) -> array:
    """Token ids (a list, an int32 numpy array or an array already) as an int32 `array.array`."""
    if isinstance(values, array) and values.typecode == "i":
        return values
    if hasattr(values, "tobytes"):  # numpy: copy the buffer, no Python ints in between
        packed = array("i")
        packed.frombytes(values.astype("int32", copy=False).tobytes())
        return packed
    return array("i", values)


def check_tokenizer(tokenizer) -> list[str]:
    """Refuse a tokenizer that cannot mark the end of a response; give one a pad distinct from EOS.
    Returns notes for the stats."""
    eos, pad, unk = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: responses cannot end in one, so the model "
                        "would never learn to stop")
    notes = []
    if pad is None or pad == eos:
        # Padding with EOS hides EOS wherever padding is masked: the model would never learn to stop.
        was = "missing" if pad is None else f"EOS ({tokenizer.eos_token!r})"
        if unk is None or unk == eos:
            raise DataError(f"the tokenizer's pad token is {was} and it has no unk token to pad with: "
                            f"add a distinct pad token (trainer.model.load_tokenizer adds <pad>)")
        tokenizer.pad_token = tokenizer.unk_token
        notes.append(f"pad token was {was}: padding with {tokenizer.unk_token!r} (id {unk}) instead")
    if tokenizer.bos_token_id is None:
        notes.append("the tokenizer has no BOS token: examples start without one")
    return notes


def render_prompt(row: dict[str, str], template: str) -> str:
    """The prompt of an instruction row: a named template (alpaca, plain) or a custom string in
    which {instruction} and {input} are replaced."""
    if template in TEMPLATES:
        with_input, without_input = TEMPLATES[template]
        chosen = with_input if row["input"].strip() else without_input
        return chosen.format(instruction=row["instruction"], input=row["input"])
    if row["input"].strip() and "{input}" not in template:
        raise DataError(f"data.template has no {{input}} placeholder but a row has an input: {row['input']!r:.60}")
    # One pass, so braces inside the row's text are never taken for placeholders.
    return re.sub(r"\{(instruction|input)\}", lambda match: row[match.group(1)], template)


def chat_template(tokenizer) -> tuple[str, str]:
    """The template chat rows are rendered with, and a note saying which it is."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own, "chat template: the tokenizer's"
    return BUILTIN_CHAT_TEMPLATE, "chat template: built-in <|role|> (the tokenizer has none)"


def as_messages(row: dict[str, str]) -> list[dict[str, str]]:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


# ------------------------------------------------------------------------------ tokenising


def tokenize_rows(tokenizer, rows: list[Row], format: str, config: DataConfig,
                  name: str = "data") -> tuple[list[Example], Counter]:
    """Examples, and counts of rows cut or dropped by the length policy (or refused by the chat
    template, with on_bad_row=skip). `name` is the dataset, for messages."""
    counts: Counter = Counter()
    use_chat = format == "chat" or config.template == "chat"
    template = chat_template(tokenizer)[0] if use_chat else None
    pieces: list[list[tuple[str, bool]] | None] = []
    for row in rows:
        try:
            if use_chat:
                messages = row.fields["messages"] if format == "chat" else as_messages(row.fields)
                pieces.append(chat_pieces(tokenizer, template, messages))
            else:
                prompt = render_prompt(row.fields, config.template)
                pieces.append([(prompt, False), (row.fields["output"], True)])
        except TemplateRefused as error:
            if config.on_bad_row != "skip":
                raise DataError(f"{name}: {row.where}: {error}") from None
            counts["skipped: refused by the chat template"] += 1
            pieces.append(None)
        except DataError as error:
            raise DataError(f"{name}: {row.where}: {error}") from None
    # Row text is tokenised literally ("<s>" in an answer is text, not BOS); a chat template's
    # rendering is not, since it writes the special tokens itself.
    texts = [text for row_pieces in pieces if row_pieces for text, _ in row_pieces]
    ids = _token_ids(tokenizer, texts, literal=not use_chat)
    examples = []
    for row, row_pieces in zip(rows, pieces):
        if row_pieces is None:
            continue
        example, outcome = assemble(tokenizer, [(next(ids), trained) for _, trained in row_pieces], config,
                                    f"{name}: {row.where}")
        if outcome != "kept":
            counts[outcome] += 1
        if example is not None:
            examples.append(Example(row.record, *example, question_id(row.fields)))
    return examples, counts


def _token_ids(tokenizer, texts: list[str], literal: bool, batch: int = 2048):
    """Each text's token ids, tokenised a batch at a time: the Python lists of a whole large dataset
    at once would take ~36 bytes a token before they become compact Examples."""
    for start in range(0, len(texts), batch):
        yield from tokenizer(texts[start:start + batch], add_special_tokens=False,
                             split_special_tokens=literal)["input_ids"]


def chat_pieces(tokenizer, template: str, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn's text, from
    where the generation prompt ends to where the turn's rendering ends, is trained."""
    pieces, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:index], generation_prompt=True)
        after = _render(tokenizer, template, messages[:index + 1], generation_prompt=False)
        if not before.startswith(rendered) or not after.startswith(before):
            raise DataError("the chat template does not render turn by turn (a shorter conversation's "
                            "text is not a prefix of the longer one's), so assistant turns cannot be "
                            "masked exactly; use a template that does, or data.template: alpaca")
        pieces += [(before[len(rendered):], False), (after[len(before):], True)]
        rendered = after
    return pieces


def _render(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises TemplateError, templates raise their own exceptions
        raise TemplateRefused(f"the chat template refused the conversation: {error}") from None


def assemble(tokenizer, pieces: list[tuple[list[int], bool]], config: DataConfig,
             where: str) -> tuple[tuple[list[int], list[int]] | None, str]:
    """BOS + pieces, ending in a trained EOS, fitted to max_seq_len. Returns ((input_ids, labels),
    "kept" | "truncated"), or (None, why it was dropped)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # The final response ends at its EOS: cut what a template writes after it (a newline), or add one.
    final_ids, _ = pieces[-1]
    if eos in final_ids:
        final_ids = final_ids[:len(final_ids) - final_ids[::-1].index(eos)]
    else:
        final_ids = final_ids + [eos]
    pieces = pieces[:-1] + [(final_ids, True)]
    # BOS exactly once: a chat template may already write it.
    first_piece = next((piece for piece, _ in pieces if piece), [])
    starts_with_bos = bos is not None and first_piece[:1] == [bos]
    ids = [bos] if bos is not None and not starts_with_bos else []
    labels = [IGNORE_INDEX] * len(ids)
    for piece, trained in pieces:
        ids += piece
        labels += piece if trained or config.train_on_prompt else [IGNORE_INDEX] * len(piece)
    head = 1 if bos is not None else 0
    labels[:head] = [IGNORE_INDEX] * head  # BOS is never a target
    response_start = len(ids) - len(final_ids)
    outcome = "kept"
    excess = len(ids) - config.max_seq_len
    if excess > 0:
        if config.on_too_long == "error":
            raise DataError(f"{where}: {len(ids)} tokens, over data.max_seq_len={config.max_seq_len} "
                            f"(data.on_too_long: truncate_prompt or drop handle such rows)")
        if config.on_too_long == "drop":
            return None, "dropped: too long"
        if excess > response_start - head:
            return None, "dropped: response alone too long"
        # Cut the prompt from its start, keeping BOS and the whole response.
        ids, labels = ids[:head] + ids[head + excess:], labels[:head] + labels[head + excess:]
        outcome = "truncated"
    return (ids, labels), outcome
