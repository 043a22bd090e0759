"""Chat templates at the edges of encoding: a BOS the template writes before some turns only
(Llama-2-chat), a row one token over max_seq_len whose turns do not end in EOS (ChatML with a
base-model EOS), a message content that also occurs inside the markup, and a row whose own text
writes special tokens' strings.

Built on the tiny base's tokenizer with ChatML's markers added as special tokens."""
from __future__ import annotations

import json

import pytest

from trainer.config import DataConfig
from trainer.data.chat_templates import BUILTIN_CHAT_TEMPLATE, Literal, _render, chat_pieces
from trainer.data.encoding import conversation_tokens, prompt_tokens
from trainer.data.examples import ANSWER, MARKUP, PROMPT
from trainer.data.pipeline import build_datasets
from trainer.data.tokenizer_checks import document_bos

# As meta-llama/Llama-2-7b-chat-hf ships it: <s> before each user turn, none before assistant turns.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
# Turns end in <|im_end|>, which is not the tokenizer's EOS: every example gets EOS appended.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer briefly."},
            {"role": "assistant", "content": "Paris."}]


@pytest.fixture
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tiny_base)
    fresh.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fresh


def build(tokenizer, tmp_path, rows, **settings):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(path=str(path), eval_fraction=0.0, cache=False, **{"max_seq_len": 256, **settings})
    return build_datasets(config, tokenizer, seed=0)


# ------------------------------------------------------------------------------ document BOS


def test_llama2_chat_bos_before_user_turns_only_is_a_document_bos(tokenizer, tmp_path):
    tokenizer.chat_template = LLAMA2_CHAT
    bos = tokenizer.bos_token_id
    assert document_bos(tokenizer) == bos
    (example,), _, stats = build(tokenizer, tmp_path, [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
    assert not any("turn marker" in note for note in stats["notes"])

    # Chat rows: the template's own <s> opens the example, never doubled; later user turns keep theirs.
    messages = QUESTION + [{"role": "user", "content": "And of Spain?"}, {"role": "assistant", "content": "Madrid."}]
    (example,), _, _ = build(tokenizer, tmp_path, [{"messages": messages}])
    assert example.input_ids[0] == bos and example.input_ids[1] != bos and example.input_ids.count(bos) == 2


def test_bos_written_before_every_message_is_a_turn_marker(tokenizer, tmp_path):
    tokenizer.chat_template = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n"
                               "{% endif %}")
    assert document_bos(tokenizer) is None
    (example,), _, stats = build(tokenizer, tmp_path, [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    assert tokenizer.bos_token_id not in example.input_ids
    assert any("turn marker" in note for note in stats["notes"])


# ------------------------------------------------------------------------------ one token over


@pytest.mark.parametrize("bos_is_turn_marker", [False, True], ids=["document-bos", "turn-marker-bos"])
def test_a_row_one_token_over_cuts_prompt_text_never_markup(tokenizer, tmp_path, bos_is_turn_marker):
    tokenizer.chat_template = CHATML
    if bos_is_turn_marker:  # SmolLM2-like: the template's <|im_start|> is the BOS
        tokenizer.bos_token = "<|im_start|>"
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    (whole,), _, stats = build(tokenizer, tmp_path, [{"messages": QUESTION}])
    assert stats["datasets"][0]["outcomes"] == {} and whole.input_ids[-1] == tokenizer.eos_token_id
    header = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    first = 0 if bos_is_turn_marker else 1
    assert list(whole.input_ids[first:first + len(header)]) == header

    # One token shorter than the example with its appended EOS, the row is tokenised piece by piece
    # (here a little shorter) and only the user's text may be cut; further down it must be.
    for max_seq_len in (len(whole.input_ids) - 1, len(whole.input_ids) - 6):
        (cut,), _, stats = build(tokenizer, tmp_path, [{"messages": QUESTION}], max_seq_len=max_seq_len)
        assert len(cut.input_ids) <= max_seq_len
        assert list(cut.input_ids[first:first + len(header)]) == header
        assert cut.input_ids.count(start) == whole.input_ids.count(start) == 2
        assert list(cut.labels[-3:]) == list(whole.labels[-3:])  # ".<|im_end|>\n" is trained, then EOS
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1}


# ------------------------------------------------------------------------------ contents in markup


def test_a_short_content_inside_a_special_token_is_found_where_the_message_is(tokenizer, tmp_path):
    tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": "Quiz time. " + "Which of these is a mammal? " * 8},
                {"role": "assistant", "content": "Pick a, b or c: a) whale b) shark c) trout"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "Correct, the whale is a mammal."}]
    pieces = chat_pieces(tokenizer, CHATML, messages)
    second_turn = pieces[pieces.index(("a", PROMPT)) - 1:]
    assert second_turn[:3] == [("<|im_start|>user\n", MARKUP), ("a", PROMPT),
                               ("<|im_end|>\n<|im_start|>assistant\n", MARKUP)]

    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    (whole,), _, _ = build(tokenizer, tmp_path, [{"messages": messages}])
    (cut,), _, stats = build(tokenizer, tmp_path, [{"messages": messages}], max_seq_len=len(whole.input_ids) - 20)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1}
    assert cut.input_ids.count(start) == whole.input_ids.count(start) == 4
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    tail = [*ids("<|im_start|>user\n"), *ids("a"), *ids("<|im_end|>\n<|im_start|>assistant\n"),
            *ids("Correct, the whale is a mammal.<|im_end|>\n"), tokenizer.eos_token_id]
    assert list(cut.input_ids[-len(tail):]) == tail


def test_a_content_inside_plain_markup_is_found_where_the_message_is(tokenizer):
    messages = [{"role": "user", "content": "s"}, {"role": "assistant", "content": "ok"}]
    pieces = chat_pieces(tokenizer, BUILTIN_CHAT_TEMPLATE, messages)
    assert pieces[:3] == [("<|user|>\n", MARKUP), ("s", PROMPT), ("\n<|assistant|>\n", MARKUP)]


def test_a_template_that_changes_contents_still_renders_whole(tokenizer):
    # The template strips contents, so the placeholders' markup does not fit: contents are then
    # found by their text, and the pieces still spell out the rendering.
    template = ("{% for m in messages %}[{{ m['role'] }} a]{{ m['content'] | trim }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant a]{% endif %}")
    messages = [{"role": "user", "content": " a"}, {"role": "assistant", "content": "b"}]
    pieces = chat_pieces(tokenizer, template, messages)
    assert "".join(text for text, _ in pieces) == _render(tokenizer, template, messages, generation_prompt=False)


def test_contents_a_trimming_template_strips_are_prompt_text_cut_and_read_literally(tokenizer, tmp_path):
    # Templates such as Llama 3's and Gemma's `| trim` the contents: a user message ending in a newline
    # is found stripped, so it is prompt text (cut when too long, its special-token strings read as
    # text), not markup.
    tokenizer.chat_template = CHATML.replace("m['content']", "m['content'] | trim")
    question = "word " * 80 + "Is <|im_end|> the end?\n"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "Yes."}]
    pieces = chat_pieces(tokenizer, tokenizer.chat_template, messages)
    (text,) = [text for text, kind in pieces if kind == PROMPT]
    assert text == question.strip() and isinstance(text, Literal)
    assert all(kind != MARKUP or "word" not in text for text, kind in pieces)
    # A short content that also occurs inside the markup ("a" in <|im_start|>) is found where the message is.
    short = chat_pieces(tokenizer, tokenizer.chat_template, [{"role": "user", "content": "a\n"},
                                                             {"role": "assistant", "content": "b"}])
    assert short[:3] == [("<|im_start|>user\n", MARKUP), ("a", PROMPT), ("<|im_end|>\n<|im_start|>assistant\n", MARKUP)]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (example,), _, stats = build(tokenizer, tmp_path, [{"messages": messages}], max_seq_len=48)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1} and len(example.input_ids) <= 48  # the question was cut
    assert list(example.input_ids).count(end) == 2  # the user turn's and the answer's: none from the text
    assert tokenizer.decode(example.input_ids).endswith("word Is <|im_end|> the end?<|im_end|>\n<|im_start|>assistant\n"
                                                        " Yes.<|im_end|>\n</s>")


# ------------------------------------------------------------------------------ custom templates


def test_a_custom_template_writing_special_tokens_is_noted_as_plain_text(tokenizer, tmp_path):
    rows = [{"instruction": f"Question {n}?", "input": "", "output": f"Answer {n}."} for n in range(4)]
    template = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    train, _, stats = build(tokenizer, tmp_path, rows, template=template)
    (note,) = [note for note in stats["notes"] if note.startswith("data.template writes")]
    assert "'<|im_end|>', '<|im_start|>'" in note and "data.template: chat" in note
    # As the note says: the template's text is not those tokens.
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in list(train[0].input_ids)
    for plain in ("alpaca", "Q: {instruction}\nA: "):
        _, _, stats = build(tokenizer, tmp_path, rows, template=plain)
        assert not [note for note in stats["notes"] if note.startswith("data.template writes")]


# ------------------------------------------------------------------------------ special tokens' strings in a row


INJECTED = [{"role": "user", "content": "What ends a turn here? Is it <|im_end|>?"},
            {"role": "assistant", "content": "Yes: <|im_end|> ends it, and </s> ends the text."}]


def test_a_rows_own_special_token_strings_are_text_not_control_tokens(tokenizer, tmp_path):
    tokenizer.chat_template = CHATML
    end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    plain = [{**message, "content": message["content"].replace("<|im_end|>", "IM END").replace("</s>", "S")}
             for message in INJECTED]
    (reference,), _, _ = build(tokenizer, tmp_path, [{"messages": plain}])
    (example,), _, _ = build(tokenizer, tmp_path, [{"messages": INJECTED}])
    # The control tokens are where the markup writes them only: as many as without the strings.
    for token in (end, eos):
        assert example.input_ids.count(token) == reference.input_ids.count(token)
    trained = [token for token, label in zip(example.input_ids, example.labels) if label != -100]
    assert tokenizer.decode(trained) == INJECTED[1]["content"] + "<|im_end|>\n</s>"
    assert trained.count(end) == 1 and trained[-1] == eos and trained.count(eos) == 1
    assert tokenizer.decode(example.input_ids).count(INJECTED[0]["content"]) == 1  # the question as written

    # Cut to fit: the same rule, the strings still text; the generation prompt tokenised alike.
    (cut,), _, stats = build(tokenizer, tmp_path, [{"messages": INJECTED}], max_seq_len=len(example.input_ids) - 3)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1}
    assert cut.input_ids.count(end) == reference.input_ids.count(end) and list(cut.labels[-5:]) == list(example.labels[-5:])
    prompt = prompt_tokens(tokenizer, {"messages": INJECTED}, "chat")
    assert prompt == list(example.input_ids[:len(prompt)]) and prompt.count(end) == 1  # the user turn's own
    assert conversation_tokens(tokenizer, INJECTED[:1]) == prompt


def test_an_answer_writing_a_special_token_string_keeps_the_markup_whole(tokenizer):
    # The assistant's text is its own piece, with the plain text the markup joins to it (Llama-2's spaces).
    pieces = chat_pieces(tokenizer, LLAMA2_CHAT, INJECTED)
    answer = [(text, type(text)) for text, kind in pieces if kind == ANSWER]
    assert answer == [(" " + INJECTED[1]["content"] + " ", Literal), ("</s>", str)]
    assert "".join(text for text, _ in pieces) == _render(tokenizer, LLAMA2_CHAT, INJECTED, generation_prompt=False)
    # Without such strings the turn stays one piece, tokenised as it always was.
    plain = [INJECTED[0], {"role": "assistant", "content": "Yes."}]
    assert [text for text, kind in chat_pieces(tokenizer, LLAMA2_CHAT, plain) if kind == ANSWER] == [" Yes. </s>"]
