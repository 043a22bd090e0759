"""Train/held-out leakage: questions compared normalised, and training rows that repeat a held-out
question dropped (and counted) by build_datasets, across a mixture and against eval_path."""
from __future__ import annotations

import json

import pytest

from trainer.config import DataConfig, DataSource
from trainer.data.pipeline import build_datasets
from trainer.data.leakage import leakage_note, question_id, row_key


def row(instruction, input_="", output="x"):
    return {"instruction": instruction, "input": input_, "output": output}


def test_questions_are_compared_normalised_and_answers_ignored():
    assert row_key(row("  Reverse   the WORD. ", "cat")) == row_key(row("reverse the word.", "cat", "other"))
    assert row_key(row("Reverse the word.", "cat")) != row_key(row("Reverse the word.", "dog"))
    chat = {"messages": [{"role": "user", "content": "Hi  there"}, {"role": "assistant", "content": "x"}]}
    assert row_key(chat) == "hi there"
    assert question_id(row(" ADD\tthe numbers.", "1 + 2")) == question_id(row("add the numbers.", "1  + 2", "3"))
    assert question_id(row("Add the numbers.", "1 + 2")) != question_id(row("Add the numbers.", "1 + 3"))


def test_the_leakage_note_counts_and_says_what_happened():
    assert "2 of 3 training rows" in leakage_note(2, 3, 5) and "dropped from train" in leakage_note(2, 3, 5)
    assert "kept in train" in leakage_note(2, 3, 5, dropped=False)
    assert leakage_note(0, 3, 5) is None


# ------------------------------------------------------------------------------ in build_datasets


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def write_json(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


HELD_OUT = [row("Reverse the word.", "cat", "tac"), row("Count the words.", "a b c", "3"),
            row("Name the capital of France.", "", "Paris"), row("Add the two numbers.", "2 + 2", "4")]
# The held-out questions again, in other case and spacing, with other answers.
PLANTED = [row("  reverse THE word. ", " cat", "TAC"), row("count   the\twords.", "a b  c", "three"),
           row("NAME the capital of france.", "", "paris")]


def test_training_rows_repeating_an_eval_path_question_are_dropped_and_counted(tokenizer, tmp_path):
    clean = [row("Add the two numbers.", f"{i} + 1", str(i + 1)) for i in range(10)]
    train_path = write_json(tmp_path / "train.json", clean[:4] + PLANTED + clean[4:])
    config = DataConfig(path=train_path, eval_path=write_json(tmp_path / "eval.json", HELD_OUT), cache=False)
    train, held_out, stats = build_datasets(config, tokenizer, seed=0)
    assert (len(train), len(held_out), stats["leaked"]) == (10, 4, 3)
    assert stats["datasets"][0]["leaked"] == 3 and stats["datasets"][0]["train"] == 10
    assert {e.question for e in train}.isdisjoint(e.question for e in held_out)
    note = "leakage: 3 of 13 training rows repeat one of the 4 held-out questions"
    assert any(line.startswith(note) and line.endswith("dropped from train") for line in stats["notes"])
    assert note in str(stats)

    kept, _, kept_stats = build_datasets(DataConfig(path=train_path, eval_path=config.eval_path, cache=False,
                                                    drop_leaked=False), tokenizer, seed=0)
    assert (len(kept), kept_stats["leaked"]) == (13, 3)
    assert any("kept in train (data.drop_leaked: false)" in line for line in kept_stats["notes"])


def test_a_held_out_question_of_one_dataset_leaks_from_the_others_train_rows(tokenizer, tmp_path):
    # b: every row asks the same question, so whichever row is held out, the rest of b repeats it, and so
    # do a's planted variants that the split left in train.
    question = row("Name the colour of the sky.", "")
    a = [row("Add the two numbers.", f"{i} + 1", str(i + 1)) for i in range(17)]
    a += [row("  NAME the colour of the SKY. ", "", f"blue {i}") for i in range(3)]
    b = [{**question, "output": f"blue, {i}"} for i in range(10)]
    mixture = [DataSource(write_json(tmp_path / "a.json", a)), DataSource(write_json(tmp_path / "b.json", b))]
    config = DataConfig(mixture=mixture, eval_fraction=0.1, cache=True)
    train, held_out, stats = build_datasets(config, tokenizer, seed=1)
    planted_held_out = sum(17 <= e.row_id < 20 for e in held_out)
    assert [s["eval"] for s in stats["datasets"]] == [2, 1]
    assert [s["leaked"] for s in stats["datasets"]] == [3 - planted_held_out, 9]
    assert [s["train"] for s in stats["datasets"]] == [18 - (3 - planted_held_out), 0]
    assert question_id(question) not in {e.question for e in train}
    # The question ids survive the tokenised cache: a second build reads them back.
    again, again_held_out, cached = build_datasets(config, tokenizer, seed=1)
    assert cached["cache"] == "hit" and (again, again_held_out) == (train, held_out)
    assert cached["leaked"] == stats["leaked"]

    kept, _, _ = build_datasets(DataConfig(mixture=mixture, eval_fraction=0.1, cache=False, drop_leaked=False),
                                tokenizer, seed=1)
    assert len(kept) == len(train) + stats["leaked"]
