"""The prompt an instruction row is trained under (data.template alpaca, plain or a custom string), as
pieces that a cut to max_seq_len can take from without breaking the template.
"""
from __future__ import annotations

import re

from trainer.data.chat_templates import special_pattern
from trainer.data.examples import CONTEXT, MARKUP, PROMPT
from trainer.data.formats import DataError

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
