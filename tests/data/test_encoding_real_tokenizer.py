"""Encoding and label checks on a real tokenizer: SmolLM2's byte-level BPE, whose BOS (<|im_start|>)
is the ChatML template's turn marker, whose config pads with EOS, and whose template adds a default
system prompt. The tiny built-in base has none of these."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED
from trainer.config import DataConfig
from trainer.data.pipeline import build_datasets
from trainer.data.formats import DataError
from trainer.data.stats import check_labels
from trainer.data.encoding import prompt_tokens
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.tokenizer_checks import document_bos

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def examples(tokenizer, tmp_path, rows, **settings):
    config = DataConfig(path=write_jsonl(tmp_path / "rows.jsonl", rows), eval_fraction=0.0, cache=False, **settings)
    train, _, stats = build_datasets(config, tokenizer, seed=0)
    return train, stats


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def prompt_part(example: Example) -> list[int]:
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return list(example.input_ids[:first_trained])


def test_pad_is_not_eos_and_bos_is_a_turn_marker(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0  # the config's pad is EOS (2)
    assert document_bos(tokenizer) is None
    ids = tokenizer("Hello wörld, 你好 🎉", add_special_tokens=False)["input_ids"]
    assert ids and tokenizer.decode(ids) == "Hello wörld, 你好 🎉"


def test_alpaca_examples_start_with_the_prompt_not_a_turn_marker(smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    (example,), stats = examples(tokenizer, tmp_path, [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    assert tokenizer.decode(example.input_ids).startswith("Below is an instruction")
    assert trained_text(tokenizer, example) == "5<|im_end|>"
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert any("turn marker" in note for note in stats["notes"])


def test_chat_examples_keep_the_template_system_prompt_masked(smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    (example,), _ = examples(tokenizer, tmp_path, [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}],
                             template="chat")
    assert tokenizer.decode(example.input_ids) == (
        SYSTEM + "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>")
    assert trained_text(tokenizer, example) == "5<|im_end|>"
    # The prompt generation sees is the training example's prompt, token for token.
    assert prompt_tokens(tokenizer, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "chat") == \
        prompt_part(example)


def test_multi_turn_chat_trains_every_assistant_turn(smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "Times 4?"},
                {"role": "assistant", "content": "20"}]
    (example,), _ = examples(tokenizer, tmp_path, [{"messages": messages}])
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n") and "SmolLM" not in text
    assert trained_text(tokenizer, example) == "5<|im_end|>\n20<|im_end|>"
    check_labels([example], tokenizer, describe=str, use_chat=True)


def test_an_answer_that_writes_im_end_is_trained_as_text_and_stops_once(smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "How does a ChatML turn end?"},
                {"role": "assistant", "content": "With <|im_end|>, as in <|im_start|>user\nhi<|im_end|>."}]
    (example,), _ = examples(tokenizer, tmp_path, [{"messages": messages}])
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    assert trained.count(end) == 1 and trained[-1] == end  # the one EOS: where the turn ends
    assert tokenizer.decode(trained) == messages[1]["content"] + "<|im_end|>"
    assert list(example.input_ids).count(end) == 3  # system, user, assistant turns
    check_labels([example], tokenizer, describe=str, use_chat=True)


def test_a_truncated_chat_row_is_cut_in_its_instruction_never_in_the_markup(smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    long_row = {"instruction": " ".join(f"word{i}" for i in range(200)) + " Reverse cat.", "input": "",
                "output": "tac"}
    huge_answer = {"instruction": "Repeat.", "input": "", "output": "cat " * 200}
    (example,), stats = examples(tokenizer, tmp_path, [long_row, huge_answer], template="chat", max_seq_len=64)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1, "dropped: response alone too long": 1}
    assert len(example.input_ids) == 64
    text = tokenizer.decode(example.input_ids)
    assert text.startswith(SYSTEM + "<|im_start|>user\n")
    assert text.endswith("word199 Reverse cat.<|im_end|>\n<|im_start|>assistant\ntac<|im_end|>")
    assert "word0 " not in text
    check_labels([example], tokenizer, describe=str, use_chat=True)
    # Generation cuts its prompt by the same rule, to the same tokens.
    assert prompt_tokens(tokenizer, long_row, "chat", max_tokens=len(prompt_part(example))) == prompt_part(example)


def test_a_chat_example_with_its_markup_cut_is_refused_naming_the_row(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer("user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
    with pytest.raises(DataError, match="row 4: does not start with the chat template's opening token"):
        check_labels([Example(4, ids, labels)], tokenizer, describe=lambda row: f"row {row}", use_chat=True)


@pytest.mark.skipif(not (SHARED / "data" / "gsm8k_train.json").exists(), reason="needs ../shared/data")
def test_real_gsm8k_rows_pass_the_label_checks_with_the_chat_template(smollm2_tokenizer):
    # Row 217 is 277 tokens with the template: cut from its start, it once lost its first turn marker.
    config = DataConfig(path=str(SHARED / "data" / "gsm8k_train.json"), template="chat", max_seq_len=256,
                        max_rows=300, eval_fraction=0.0, cache=False)
    train, _, stats = build_datasets(config, smollm2_tokenizer, seed=0)
    assert stats["datasets"][0]["outcomes"].get("truncated", 0) > 0
    row_217 = next(e for e in train if e.row_id == 216)
    assert len(row_217.input_ids) == 256
    assert smollm2_tokenizer.decode(row_217.input_ids).startswith(SYSTEM + "<|im_start|>user\n")
