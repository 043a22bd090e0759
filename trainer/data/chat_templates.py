"""Chat rows rendered with a chat template turn by turn and cut where the mask changes: each assistant
turn trained, the other messages' contents prompt text, the template's own text markup kept whole.
"""
from __future__ import annotations

import re
import weakref

from trainer.data.examples import ANSWER, MARKUP, PROMPT
from trainer.data.formats import DataError

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
