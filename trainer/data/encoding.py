"""Rows -> token ids with labels: prompt templates, chat templates rendered turn by turn, BOS and
EOS hygiene, and the length policy.

Every example is [document BOS] + text pieces, each piece tokenised on its own and either trained
(the response, or an assistant turn plus its end-of-turn), masked prompt text that the length
policy may cut (an instruction, a row's input, a user turn's content), or masked markup that is
never cut (an instruction template's own text, a chat template's turn headers, its default system
prompt). Tokenising the pieces apart makes the mask boundary exact, and cutting only prompt text
keeps a truncated prompt well formed.
Every example ends in a trained EOS. A row's own text is tokenised literally: a special token's
string in it (an answer that writes "<|im_end|>" or "</s>") is text, never the control token that the
markup writes (which would train the model to stop there).

A tokenizer's BOS is a document start (Llama's <s>) unless its chat template writes the BOS token
as a turn marker (ChatML bases such as SmolLM2, whose BOS is <|im_start|>): then no BOS is
prepended, and chat examples start with the template's own first token.
"""
from __future__ import annotations

import re
import weakref
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from trainer.config import DataConfig
from trainer.data.formats import DataError, Row
from trainer.data.leakage import question_id

IGNORE_INDEX = -100

# What a piece of an example is: trained, masked prompt text the length policy may cut from its
# start, or masked markup that is kept whole. CONTEXT is prompt text cut before any PROMPT piece: an
# instruction row's input, which the model can do without more readily than the instruction that
# says what to do.
ANSWER, PROMPT, CONTEXT, MARKUP = "answer", "prompt", "context", "markup"

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


class Literal(str):
    """A chat row's own text (a message's content, with any plain text the markup joins to it): its
    special tokens' strings are text, tokenised as such. The markup around it is tokenised with its
    special tokens. Joining pieces (`_joined`) gives a plain str."""


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


def render_prompt(row: dict[str, str], template: str) -> str:
    """The prompt of an instruction row: a named template (alpaca, plain) or a custom string in
    which {instruction} and {input} are replaced."""
    return "".join(text for text, _ in prompt_pieces(row, template))


def prompt_pieces(row: dict[str, str], template: str) -> list[tuple[str, str]]:
    """The prompt of an instruction row as (text, kind) pieces: the template's own text is markup,
    the instruction prompt text and the input context, so that a cut keeps the template's header and
    section titles and takes the input before the instruction."""
    if template in TEMPLATES:
        with_input, without_input = TEMPLATES[template]
        template = with_input if row["input"].strip() else without_input
    elif row["input"].strip() and "{input}" not in template:
        raise DataError(f"data.template has no {{input}} placeholder but a row has an input: {row['input']!r:.60}")
    # One pass over the template, so braces inside the row's text are never taken for placeholders.
    parts = re.split(r"\{(instruction|input)\}", template)  # markup, field, markup, field, ..., markup
    pieces = [(row[part], PROMPT if part == "instruction" else CONTEXT) if index % 2 else (part, MARKUP)
              for index, part in enumerate(parts)]
    return [(text, kind) for text, kind in pieces if text]


def template_note(tokenizer, template: str) -> str | None:
    """A custom data.template is tokenised as plain text, as the rows' text is: a special token
    written in it (<|im_start|>, </s>) becomes ordinary text there, not that token. A note saying
    so, or None."""
    if template in TEMPLATES or template == "chat":
        return None
    written = sorted(set(special_pattern(tokenizer).findall(template)))
    return None if not written else (
        f"data.template writes {', '.join(map(repr, written))}, special token(s) of this tokenizer, as plain "
        f"text: the template's text is tokenised literally, so they are not those tokens (data.template: "
        f"chat renders the tokenizer's own chat template, special tokens included)")


def chat_template(tokenizer) -> tuple[str, str]:
    """The template chat rows are rendered with, and a note saying which it is."""
    own = own_chat_template(tokenizer)
    if own is not None:
        return own, "chat template: the tokenizer's"
    return BUILTIN_CHAT_TEMPLATE, "chat template: built-in <|role|> (the tokenizer has none)"


def own_chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template, or None where it has none. A tokenizer saved with several named
    templates (Hermes, Command-R: chat_template.jinja beside additional_chat_templates/) loads them as
    a dict, and transformers' apply_chat_template renders with its "default" entry: so does this."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict) and own:
        if "default" not in own:
            raise DataError(f"the tokenizer has several chat templates ({', '.join(map(repr, sorted(own)))}) and none "
                            f"named 'default', so which one to render with is unclear: save the one to train with "
                            f"as chat_template.jinja in the tokenizer's directory (transformers loads it as the default)")
        own = own["default"]
    return own if isinstance(own, str) and own else None


def as_messages(row: dict[str, str]) -> list[dict[str, str]]:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


# ------------------------------------------------------------------------------ tokenising


def tokenize_rows(tokenizer, rows: list[Row], format: str, config: DataConfig,
                  name: str = "data") -> tuple[list[Example], Counter]:
    """Examples, and counts of rows cut or dropped by the length policy (or refused by the chat
    template, with on_bad_row=skip). `name` is the dataset, for messages."""
    counts: Counter = Counter()
    examples = [Example(row.record, *encoded) for row, *encoded in _encoded(tokenizer, rows, format, config, name, counts)]
    return examples, counts


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


def _length(tokenised: list[tuple[list[int], str]]) -> int:
    return sum(len(piece) for piece, _ in tokenised)


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


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_pattern(tokenizer) -> re.Pattern:
    """A pattern matching the strings this tokenizer reads as special tokens (unless told to split
    them), longest first. Kept per tokenizer while its vocabulary and special tokens stay the same: a
    row is checked with it, and added_tokens_decoder costs per call (hundreds of tokens on Llama-3)."""
    key = (len(tokenizer), tuple(tokenizer.all_special_tokens))
    cached = _SPECIALS.get(tokenizer)
    if cached is None or cached[0] != key:
        added = getattr(tokenizer, "added_tokens_decoder", {})
        strings = {*tokenizer.all_special_tokens, *(token.content for token in added.values() if token.special)} - {""}
        alternatives = "|".join(map(re.escape, sorted(strings, key=len, reverse=True)))
        cached = _SPECIALS[tokenizer] = (key, re.compile(alternatives or "(?!)"))  # (?!): matches nothing
    return cached[1]


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


def chat_pieces(tokenizer, template: str, messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The rendered conversation cut into (text, kind) pieces: each assistant turn's text, from
    where the generation prompt ends to where the turn's rendering ends, is trained; the text
    before it is markup, except the other messages' contents, which are prompt text."""
    pieces, rendered, since = [], "", 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:index], generation_prompt=True)
        after = _render(tokenizer, template, messages[:index + 1], generation_prompt=False)
        if not before.startswith(rendered) or not after.startswith(before):
            raise DataError("the chat template does not render turn by turn (a shorter conversation's "
                            "text is not a prefix of the longer one's), so assistant turns cannot be "
                            "masked exactly; use a template that does, or data.template: alpaca")
        segment, contents = before[len(rendered):], [m["content"] for m in messages[since:index]]
        split = None
        if _ambiguous(segment, contents):
            split = _split_by_placeholders(tokenizer, template, messages[:index], since, segment)
        pieces += _split_contents(segment, contents) if split is None else split
        pieces += _answer_pieces(tokenizer, after[len(before):], message["content"])
        rendered, since = after, index + 1
    return pieces


def _answer_pieces(tokenizer, text: str, content: str) -> list[tuple[str, str]]:
    """An assistant turn's text (its content and the markup that ends the turn) as trained pieces:
    one, unless the content holds a special token's string. Then the content, with the plain text
    the markup writes on either side up to its special tokens, is a `Literal` piece of its own."""
    markup = special_pattern(tokenizer)
    if not markup.search(content):
        return [(text, ANSWER)]
    found = next(((text.find(part), part) for part in (content, content.strip()) if part and part in text), None)
    if found is None:
        return [(text, ANSWER)]
    at, part = found
    head, tail = text[:at], text[at + len(part):]
    head_end = max((match.end() for match in markup.finditer(head)), default=0)
    tail_start = next((match.start() for match in markup.finditer(tail)), len(tail))
    pieces = [head[:head_end], Literal(head[head_end:] + part + tail[:tail_start]), tail[tail_start:]]
    return [(piece, ANSWER) for piece in pieces if piece]


def _split_contents(text: str, contents: list[str]) -> list[tuple[str, str]]:
    """`text` as markup pieces around the given message contents (prompt pieces), found in order: as
    written, or stripped (templates that `| trim` the contents). A content the template changed
    otherwise (and so is not found) stays inside the markup."""
    pieces, cursor = [], 0
    for content in contents:
        start, part = _find_content(text, content, cursor)
        if start < 0:
            continue
        pieces += [(text[cursor:start], MARKUP), (Literal(part), PROMPT)]
        cursor = start + len(part)
    pieces.append((text[cursor:], MARKUP))
    return [(piece, kind) for piece, kind in pieces if piece]


def _find_content(text: str, content: str, cursor: int) -> tuple[int, str]:
    """Where a message's content is in `text` from `cursor` on, and as what: itself or stripped of the
    whitespace a template may trim, whichever comes first (itself where both start there; "Be brief "
    written as "Be brief" must not be found in a later "Be brief about it"); (-1, "") where neither is."""
    found = [(start, -len(part), part) for part in dict.fromkeys((content, content.strip()))
             if part and (start := text.find(part, cursor)) >= 0]
    if not found:
        return -1, ""
    start, _, part = min(found)
    return start, part


def _ambiguous(text: str, contents: list[str]) -> bool:
    """Whether a content occurs in `text` again after where `_split_contents` would find it: the
    first match may then lie in the markup (a reply "a" inside <|im_start|> or "assistant"), and
    taking it would split the markup, even a special token, into text the length policy may cut."""
    cursor = 0
    for content in contents:
        start, part = _find_content(text, content, cursor)
        if start < 0:
            continue
        if text.find(part, start + 1) >= 0:
            return True
        cursor = start + len(part)
    return False


def _placeholder(index: int) -> str:
    return f"\ue000{index}\ue001"  # private-use characters, which no template writes


def _split_by_placeholders(tokenizer, template: str, messages: list[dict[str, str]], since: int,
                           text: str) -> list[tuple[str, str]] | None:
    """`text`, the rendering of messages[since:] (with the generation prompt) after that of
    messages[:since], split exactly where the contents are: the same conversation rendered with a
    placeholder for each content shows the markup around them. None when the template writes other
    markup around a placeholder than around the content (it changed the content other than by
    stripping it), or refuses the placeholders; the caller then finds contents by their text."""
    marked = [{**message, "content": _placeholder(index)} for index, message in enumerate(messages)]
    try:
        start = _render(tokenizer, template, marked[:since], generation_prompt=False) if since else ""
        end = _render(tokenizer, template, marked, generation_prompt=True)
    except TemplateRefused:
        return None
    if not end.startswith(start):
        return None
    marked_text = end[len(start):]
    pieces, cursor, marked_cursor = [], 0, 0
    for index in range(since, len(messages)):
        content, placeholder = messages[index]["content"], _placeholder(index)
        at = marked_text.find(placeholder, marked_cursor)
        if at < 0:  # a message the template does not write
            continue
        markup = marked_text[marked_cursor:at]
        # The content as written, or stripped (a template that trims contents leaves a placeholder as it is).
        part = next((part for part in (content, content.strip())
                     if text.startswith(markup, cursor) and text.startswith(part, cursor + len(markup))), None)
        if part is None:
            return None
        pieces += [(markup, MARKUP), (Literal(part), PROMPT)]
        cursor, marked_cursor = cursor + len(markup) + len(part), at + len(placeholder)
    if text[cursor:] != marked_text[marked_cursor:]:
        return None
    pieces.append((text[cursor:], MARKUP))
    return [(piece, kind) for piece, kind in pieces if piece]


def _render(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises TemplateError, templates raise their own exceptions
        raise TemplateRefused(f"the chat template refused the conversation: {error}") from None


def assemble(tokenizer, pieces: list[tuple[list[int], str]], config: DataConfig,
             where: str, bos: int | None) -> tuple[tuple[list[int], list[int]] | None, str]:
    """[`bos`] + pieces, ending in a trained EOS, fitted to max_seq_len by cutting prompt pieces from
    their start. `bos` is `document_bos(tokenizer)`, computed once by the caller. Returns ((input_ids, labels), "kept" | "truncated"), or (None, why it
    was dropped: the response alone is too long, or the cut would take all the prompt text, leaving an
    answer to no question)."""
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
            return None, "dropped: response alone too long"
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
