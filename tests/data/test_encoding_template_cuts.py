"""Instruction-template rows over data.max_seq_len: the template's own text (Alpaca's header and
section titles) is markup kept whole, the input is cut before the instruction, each from its start,
and a row left with no prompt text is dropped and counted. Rows that fit are tokenised as before,
the whole prompt at once. Generation cuts its prompts by the same rule.

Built on the tiny base's SentencePiece-style tokenizer, which tokenises a prompt whole differently
from piece by piece; the gsm8k check on SmolLM2's tokenizer needs ../shared/data."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED
from trainer.config import DataConfig
from trainer.data.encoding import prompt_tokens
from trainer.data.examples import CONTEXT, IGNORE_INDEX, MARKUP, PROMPT, Example
from trainer.data.formats import DataError
from trainer.data.instruction_templates import TEMPLATES, prompt_pieces, render_prompt
from trainer.data.pipeline import build_datasets

HEADER = TEMPLATES["alpaca"][1].split("{instruction}")[0]  # "Below is an instruction ...### Instruction:\n"
RESPONSE = "\n\n### Response:\n"
LONG_INSTRUCTION = {"instruction": " ".join(f"w{i}" for i in range(60)) + " Reverse cat.", "input": "",
                    "output": "tac"}
LONG_INPUT = {"instruction": "Translate to French.", "input": " ".join(f"hello{i}" for i in range(60)),
              "output": "Bonjour."}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def build(tokenizer, tmp_path, rows, **settings) -> tuple[list[Example], dict]:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(path=str(path), eval_fraction=0.0, cache=False, **settings)
    train, _, stats = build_datasets(config, tokenizer, seed=0)
    return list(train), stats


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_part(example: Example) -> list[int]:
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return list(example.input_ids[:first_trained])


# ------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("template", ["alpaca", "plain"])
@pytest.mark.parametrize("given", ["7 + 12", ""])
def test_named_templates_split_into_markup_instruction_and_input_and_render_as_before(template, given):
    row = {"instruction": "Add the {input} numbers.", "input": given, "output": "19"}
    with_input, without_input = TEMPLATES[template]
    pieces = prompt_pieces(row, template)
    assert render_prompt(row, template) == "".join(text for text, _ in pieces) == \
        (with_input if given else without_input).format(**row)
    assert [text for text, kind in pieces if kind == PROMPT] == [row["instruction"]]
    assert [text for text, kind in pieces if kind == CONTEXT] == ([given] if given else [])
    markup = "".join(text for text, kind in pieces if kind == MARKUP)
    assert markup == (with_input if given else without_input).replace("{instruction}", "").replace("{input}", "")


def test_a_custom_template_is_split_at_its_placeholders_and_row_braces_stay_text():
    row = {"instruction": "Say {input}.", "input": "now {instruction}", "output": "x"}
    assert prompt_pieces(row, "Q: {instruction} [{input}]\nA:") == [
        ("Q: ", MARKUP), ("Say {input}.", PROMPT), (" [", MARKUP), ("now {instruction}", CONTEXT), ("]\nA:", MARKUP)]
    assert prompt_pieces(row, "{input}\n{instruction}") == [
        ("now {instruction}", CONTEXT), ("\n", MARKUP), ("Say {input}.", PROMPT)]
    with pytest.raises(DataError, match="no {input} placeholder"):
        prompt_pieces(row, "Q: {instruction}")


# ------------------------------------------------------------------------------ the length policy


def test_rows_that_fit_are_tokenised_with_their_whole_prompt_at_once(tokenizer, tmp_path):
    row = {"instruction": "Add the two numbers.", "input": "7 + 12", "output": "19"}
    pieces = prompt_pieces(row, "alpaca")
    whole = ids(tokenizer, render_prompt(row, "alpaca"))
    assert whole != [token for text, _ in pieces for token in ids(tokenizer, text)]  # apart would differ
    expected = [tokenizer.bos_token_id, *whole, *ids(tokenizer, "19"), tokenizer.eos_token_id]
    (example,), stats = build(tokenizer, tmp_path, [row], max_seq_len=len(expected))  # fits exactly
    assert list(example.input_ids) == expected and stats["datasets"][0]["outcomes"] == {}
    assert prompt_tokens(tokenizer, row, "alpaca", max_tokens=len(whole) + 1) == prompt_part(example)


def test_a_long_instruction_is_cut_from_its_start_and_the_template_kept_whole(tokenizer, tmp_path):
    (example,), stats = build(tokenizer, tmp_path, [LONG_INSTRUCTION], max_seq_len=64)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1} and len(example.input_ids) == 64
    prompt = prompt_part(example)
    header, response = ids(tokenizer, HEADER), ids(tokenizer, RESPONSE)
    assert prompt[:1 + len(header)] == [tokenizer.bos_token_id, *header]
    assert prompt[-len(response):] == response
    instruction = prompt[1 + len(header):-len(response)]
    assert 0 < len(instruction) and instruction == ids(tokenizer, LONG_INSTRUCTION["instruction"])[-len(instruction):]
    assert tokenizer.decode(instruction).endswith("Reverse cat.") and "w0 " not in tokenizer.decode(instruction)
    # Generation cuts its prompt by the same rule, to the same tokens; cut to nothing, the markup stays.
    assert prompt_tokens(tokenizer, LONG_INSTRUCTION, "alpaca", max_tokens=len(prompt)) == prompt
    assert prompt_tokens(tokenizer, LONG_INSTRUCTION, "alpaca", max_tokens=0) == \
        [tokenizer.bos_token_id, *header, *response]


def test_the_input_is_cut_before_the_instruction(tokenizer, tmp_path):
    with_input = TEMPLATES["alpaca"][0]
    head, middle, tail = (ids(tokenizer, text) for text in
                          (with_input.split("{instruction}")[0], "\n\n### Input:\n", RESPONSE))
    instruction, given = ids(tokenizer, LONG_INPUT["instruction"]), ids(tokenizer, LONG_INPUT["input"])
    answer = len(ids(tokenizer, LONG_INPUT["output"])) + 1  # and its EOS
    markup = 1 + len(head) + len(middle) + len(tail)
    # Room for the instruction and 10 tokens of the input: the input loses its start, the instruction nothing.
    (example,), stats = build(tokenizer, tmp_path, [LONG_INPUT], max_seq_len=markup + len(instruction) + 10 + answer)
    assert stats["datasets"][0]["outcomes"] == {"truncated": 1}
    assert prompt_part(example) == [tokenizer.bos_token_id, *head, *instruction, *middle, *given[-10:], *tail]
    # Room for half the instruction: the input is gone, then the instruction loses its start.
    half = len(instruction) // 2
    (example,), _ = build(tokenizer, tmp_path, [LONG_INPUT], max_seq_len=markup + half + answer)
    assert prompt_part(example) == [tokenizer.bos_token_id, *head, *instruction[-half:], *middle, *tail]
    assert prompt_tokens(tokenizer, LONG_INPUT, "alpaca", max_tokens=markup + half) == prompt_part(example)


@pytest.mark.parametrize("template", ["alpaca", "plain", "### Q: {instruction}\n{input}\n### A:"])
def test_a_row_whose_prompt_text_would_be_cut_away_is_dropped_and_counted(tokenizer, tmp_path, template):
    fits = {"instruction": "Reverse the word cat.", "input": "", "output": "tac"}
    markup_and_answer = len(prompt_tokens(tokenizer, LONG_INPUT, template, max_tokens=0)) + \
        len(ids(tokenizer, LONG_INPUT["output"])) + 1
    train, stats = build(tokenizer, tmp_path, [fits, LONG_INPUT], template=template, max_seq_len=markup_and_answer)
    assert [example.row_id for example in train] == [0]
    assert stats["datasets"][0]["outcomes"] == {"dropped: prompt cut to nothing": 1}
    assert stats["dropped"] == 1
    # One token more keeps the last token of the instruction.
    train, stats = build(tokenizer, tmp_path, [LONG_INPUT], template=template, max_seq_len=markup_and_answer + 1)
    assert len(train) == 1 and stats["datasets"][0]["outcomes"] == {"truncated": 1}


@pytest.mark.skipif(not (SHARED / "data" / "gsm8k_train.json").exists(), reason="needs ../shared/data")
def test_truncated_gsm8k_rows_keep_the_alpaca_header_and_the_others_are_unchanged(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    rows = json.loads((SHARED / "data" / "gsm8k_train.json").read_text())[:300]
    config = DataConfig(path=str(SHARED / "data" / "gsm8k_train.json"), max_seq_len=256, max_rows=300,
                        eval_fraction=0.0, cache=False)
    train, _, stats = build_datasets(config, tokenizer, seed=0)
    truncated = 0
    for example in train:
        row = rows[example.row_id]
        prompt = prompt_part(example)
        whole = ids(tokenizer, render_prompt(row, "alpaca"))  # SmolLM2's BOS is a turn marker: none prepended
        if prompt == whole:
            assert list(example.input_ids) == whole + ids(tokenizer, row["output"]) + [tokenizer.eos_token_id]
            continue
        truncated += 1
        assert len(example.input_ids) == 256
        text = tokenizer.decode(prompt)
        assert text.startswith(HEADER) and text.endswith(RESPONSE)
        assert text[len(HEADER):-len(RESPONSE)].strip() in row["instruction"]  # its end, cut from its start
    assert truncated == stats["datasets"][0]["outcomes"]["truncated"] > 0
