"""A tokenizer saved with several named chat templates (Hermes, Command-R), which transformers 5 loads
as a dict: its "default" entry is the template, as for transformers' apply_chat_template, in training,
in the BOS rule and in a GGUF file's metadata; without a default it is refused, naming the templates.

Built on the tiny base's tokenizer, saved and loaded again the way such a tokenizer ships."""
from __future__ import annotations

import json

import pytest

from trainer.config import DataConfig
from trainer.data.chat_templates import BUILTIN_CHAT_TEMPLATE, chat_template
from trainer.data.formats import DataError
from trainer.data.pipeline import build_datasets
from trainer.data.tokenizer_checks import document_bos
from trainer.evaluation.gguf_mapping import tokenizer_metadata

# BOS before every message: a turn marker, so examples get no BOS of their own.
DEFAULT = ("{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}{{ bos_token }}[assistant] {% endif %}")
TOOL_USE = "{% for m in messages %}TOOLS {{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]


def saved_with(tiny_base, tmp_path, templates: dict[str, str]):
    """The tiny base's tokenizer with `templates`, saved (chat_template.jinja for the default, the
    others under additional_chat_templates/) and loaded again."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = templates
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return AutoTokenizer.from_pretrained(tmp_path / "tokenizer")


def build(tokenizer, tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return build_datasets(DataConfig(path=str(path), eval_fraction=0.0, cache=False), tokenizer, seed=0)


def test_named_templates_render_with_the_default_as_transformers_does(tiny_base, tmp_path):
    tokenizer = saved_with(tiny_base, tmp_path, {"default": DEFAULT, "tool_use": TOOL_USE})
    assert tokenizer.chat_template == {"default": DEFAULT, "tool_use": TOOL_USE}  # as transformers 5 loads it
    assert chat_template(tokenizer) == (DEFAULT, "chat template: the tokenizer's")
    assert document_bos(tokenizer) is None  # the default writes BOS before every message
    (example,), _, stats = build(tokenizer, tmp_path, [{"messages": MESSAGES}])
    assert "chat template: the tokenizer's" in stats["notes"]
    assert tokenizer.decode(example.input_ids).startswith("<s>[user] Add 2 and 3.</s><s>[assistant]")

    # The same examples as with the default alone, an instruction template's too.
    from transformers import AutoTokenizer

    alone = AutoTokenizer.from_pretrained(tiny_base)
    alone.chat_template = DEFAULT
    for row in ({"messages": MESSAGES}, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}):
        assert list(build(tokenizer, tmp_path, [row])[0]) == list(build(alone, tmp_path, [row])[0])


def test_named_templates_without_a_default_are_refused_naming_them(tiny_base, tmp_path):
    tokenizer = saved_with(tiny_base, tmp_path, {"tool_use": TOOL_USE, "rag": TOOL_USE})
    assert tokenizer.chat_template == {"tool_use": TOOL_USE, "rag": TOOL_USE}
    refusal = r"several chat templates \('rag', 'tool_use'\) and none named 'default'.*chat_template\.jinja"
    with pytest.raises(DataError, match=refusal):
        chat_template(tokenizer)
    with pytest.raises(DataError, match=refusal):
        document_bos(tokenizer)
    with pytest.raises(DataError, match=refusal):
        build(tokenizer, tmp_path, [{"messages": MESSAGES}])


def test_a_gguf_file_carries_the_default_template(tiny_base, tmp_path):
    tokenizer = saved_with(tiny_base, tmp_path, {"default": DEFAULT, "tool_use": TOOL_USE})
    assert tokenizer_metadata(tokenizer, len(tokenizer))["chat_template"] == DEFAULT
    tokenizer.chat_template = None
    assert "chat_template" not in tokenizer_metadata(tokenizer, len(tokenizer))
    assert chat_template(tokenizer)[0] == BUILTIN_CHAT_TEMPLATE
