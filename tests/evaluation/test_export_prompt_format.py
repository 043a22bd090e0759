"""An export carries the chat template of the prompts the adapter was trained on, so that a chat
client (llama.cpp, ollama, transformers' apply_chat_template) prompts it as training did:
- data.template: chat on a base without a chat template: the built-in one training rendered with;
- an instruction template (alpaca, plain, custom) on a base without one: a template that renders a
  single user message as training's prompt, checked token for token against our encoder;
- an instruction template on a base with a chat template: the base's is kept, with a warning.
What training used is read from the checkpoint (meta.json, recipe.yaml), not from the recipe given."""
from __future__ import annotations

import copy
import json

import pytest

from _checkpoints import make_checkpoint, one_thread, tiny_recipe
from trainer.data.chat_templates import BUILTIN_CHAT_TEMPLATE
from trainer.data.encoding import conversation_tokens, prompt_tokens
from trainer.data.tokenizer_checks import document_bos
from trainer.evaluation.export import (ExportOptions, export, instruction_chat_template, trained_prompt_format,
                                       training_chat_template)
from trainer.model.base import load_tokenizer, resolve_base

# Text a template must keep whole: braces and jinja syntax are the user's text, never the template's.
MESSAGES = ["Add 2 and 3.", " a leading space", "two\nlines  and\ta tab", "café, 日本語, 🙂",
            "braces {input} {{ x }} {% if %} it's \\n", ""]
CUSTOM = "\n'Q' {instruction}\\ {input}\n\nA:"  # quotes, a backslash, newlines at both ends


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def tiny_tokenizer():
    recipe = tiny_recipe()
    return load_tokenizer(resolve_base(recipe), recipe)


def llama2_tokenizer(tmp_path):
    """The real Llama-2 tokenizer (SentencePiece, prepends "▁" to every piece of text), converted from
    /work/shared's tokenizer.model; skips where it is absent."""
    from conftest import shared_llama2

    return load_tokenizer(str(shared_llama2(tmp_path / "llama2")), tiny_recipe())


def rendered_tokens(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """What a chat client feeds the model: the rendered template tokenised, with BOS first where the
    GGUF says add_bos_token (the document BOS that training put before every example)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = document_bos(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("base", ["tiny", "llama2"])
def test_the_instruction_chat_template_gives_trainings_prompt_tokens(base, tiny_base, tmp_path):
    tokenizer = tiny_tokenizer() if base == "tiny" else llama2_tokenizer(tmp_path)
    for template in ("alpaca", "plain", CUSTOM):
        with_template = copy.deepcopy(tokenizer)
        with_template.chat_template = instruction_chat_template(template)
        for message in MESSAGES:
            expected = prompt_tokens(tokenizer, {"instruction": message, "input": "", "output": ""}, template)
            assert rendered_tokens(with_template, [{"role": "user", "content": message}]) == expected, \
                (template, message)
        # Training saw single prompts: a conversation or a system message is refused, not made up.
        for conversation in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]):
            with pytest.raises(Exception, match="single instruction prompts: give one user message"):
                with_template.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert document_bos(with_template) == document_bos(tokenizer)  # the BOS rule reads the template


def test_a_chat_adapter_on_a_base_without_a_chat_template_exports_the_builtin_one(tmp_path, tiny_base):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    adapter = make_checkpoint(tmp_path / "run", "data.template=chat")
    recipe = tiny_recipe("data.template=chat")
    original = tiny_tokenizer()
    assert original.chat_template is None  # training rendered with the built-in template
    out = export(recipe, ExportOptions(adapter=str(adapter), out=str(tmp_path / "hf")))
    exported = AutoTokenizer.from_pretrained(out)  # plain transformers, as a user of the export loads it
    assert exported.chat_template == BUILTIN_CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "And 4 and 5?"}]
    assert rendered_tokens(exported, conversation[:1]) == conversation_tokens(original, conversation[:1])
    # Later turns: training tokenised each answer apart, which a client tokenising the whole text cannot
    # match exactly; this project's chat on the export writes them as training did.
    reloaded = load_tokenizer(str(out), recipe)
    for messages in (conversation[:1], conversation):
        assert conversation_tokens(reloaded, messages) == conversation_tokens(original, messages)

    gguf_file = export(recipe, ExportOptions(adapter=str(adapter), out=str(tmp_path / "chat.gguf")))
    assert GGUFReader(gguf_file).fields["tokenizer.chat_template"].contents() == BUILTIN_CHAT_TEMPLATE


def test_an_alpaca_adapter_exports_a_template_that_prompts_as_training_did(tmp_path, tiny_base, capsys):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    adapter = make_checkpoint(tmp_path / "run")  # data.template: alpaca
    out = export(tiny_recipe(), ExportOptions(adapter=str(adapter), out=str(tmp_path / "hf")))
    assert "renders one user message as that prompt" in capsys.readouterr().out
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == instruction_chat_template("alpaca")
    original = tiny_tokenizer()
    for message in MESSAGES:
        assert rendered_tokens(exported, [{"role": "user", "content": message}]) == prompt_tokens(
            original, {"instruction": message, "input": "", "output": ""}, "alpaca")
    gguf_file = export(tiny_recipe(), ExportOptions(adapter=str(adapter), out=str(tmp_path / "alpaca.gguf")))
    fields = GGUFReader(gguf_file).fields
    assert fields["tokenizer.chat_template"].contents() == instruction_chat_template("alpaca")
    assert bool(fields["tokenizer.ggml.add_bos_token"].contents())  # the BOS the template leaves out


def test_a_base_chat_template_is_kept_with_a_warning_for_an_instruction_adapter(tiny_base):
    own = "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = own
    template, line = training_chat_template(tokenizer, "alpaca")
    assert template == own
    assert line.startswith("warning: the adapter was trained on data.template=alpaca prompts, but the export keeps")
    assert "(trainer/data/instruction_templates.py TEMPLATES;" in line
    _, line = training_chat_template(tokenizer, "Q: {instruction}\nA: ")
    assert "data.template=custom ('Q: {instruction}\\nA: ') prompts" in line
    assert "(data.template in the checkpoint's recipe.yaml;" in line and "TEMPLATES" not in line
    template, line = training_chat_template(tokenizer, "chat")
    assert template == own and line.startswith("note: the export keeps the base's chat template")


def test_the_prompt_format_is_what_the_checkpoint_recorded(tmp_path, tiny_base):
    adapter = make_checkpoint(tmp_path / "run", "data.template=plain")
    assert trained_prompt_format(tiny_recipe("data.template=chat"), adapter) == "plain"  # not the recipe given
    meta = json.loads((adapter / "meta.json").read_text())
    (adapter / "meta.json").write_text(json.dumps({**meta, "chat_rendered": True}))  # chat rows, data.format=auto
    assert trained_prompt_format(tiny_recipe(), adapter) == "chat"
    (adapter / "meta.json").unlink()
    (adapter / "recipe.yaml").unlink()
    assert trained_prompt_format(tiny_recipe("data.template=chat"), adapter) == "chat"  # nothing recorded: the recipe
    assert trained_prompt_format(tiny_recipe("data.format=chat"), adapter) == "chat"
