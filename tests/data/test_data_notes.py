"""What a user is told about rows that will not be trained on: when none are left, where every row
went and what to change (the data table is never printed then); and columns of a file that no field
reads, such as a `context` left out of data.columns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import DataConfig, DataSource
from trainer.data.formats import DataError
from trainer.data.pipeline import _held_out_records, build_datasets

LONG = "one two three four five six seven eight nine ten " * 2
SHORT = "red"


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def training_data(data: DataConfig, tokenizer, seed: int):
    """The run's data step (setup.prepare_data), which refuses a run with no training example."""
    from dataclasses import replace

    from _checkpoints import tiny_recipe
    from trainer import setup

    return setup.prepare_data(replace(tiny_recipe(), data=data, train=replace(tiny_recipe().train, seed=seed)),
                              tokenizer)


def config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **{"eval_fraction": 0.0, "cache": False, "max_seq_len": 256, **overrides})


def rows(outputs: list[str]) -> list[dict]:
    return [{"instruction": f"Name a colour, any colour you like at all. {i}", "input": "", "output": output}
            for i, output in enumerate(outputs)]


# ------------------------------------------------------------------------------ no training example left


def test_rows_all_dropped_by_length_are_counted_by_reason_with_what_to_change(tokenizer, tmp_path):
    # At 34 tokens (the tiny tokenizer, the Alpaca template) a LONG answer does not fit at all, and a
    # SHORT one fits only with its whole instruction cut.
    path = write_jsonl(tmp_path / "rows.jsonl", rows([LONG, LONG, LONG, SHORT, SHORT]))
    with pytest.raises(DataError) as raised:
        training_data(config(path, max_seq_len=34), tokenizer, seed=0)
    assert str(raised.value) == (
        "no training examples left. rows.jsonl: 5 rows read: 5 dropped (prompt cut to nothing: 2, response alone "
        "too long for data.max_seq_len=34: 3). To keep some: raise data.max_seq_len (now 34)")
    with pytest.raises(DataError, match=r"rows\.jsonl: 5 rows read: 5 dropped \(too long for data\.max_seq_len=34: "
                                        r"5\)\. To keep some: raise data\.max_seq_len \(now 34\) or set "
                                        r"data\.on_too_long=truncate_prompt"):
        training_data(config(path, max_seq_len=34, on_too_long="drop"), tokenizer, seed=0)


def test_a_short_response_the_templates_own_text_leaves_no_room_for_is_not_called_too_long(tokenizer, tmp_path):
    # At 20 tokens Alpaca's own text (never cut) does not fit: "red" is not too long, the template is.
    path = write_jsonl(tmp_path / "rows.jsonl", rows([LONG, SHORT]))
    with pytest.raises(DataError) as raised:
        training_data(config(path, max_seq_len=20), tokenizer, seed=0)
    assert "rows.jsonl: 2 rows read: 2 dropped (response alone too long for data.max_seq_len=20: 1, template text + " \
           "response too long for data.max_seq_len=20: 1)" in str(raised.value)


def test_a_held_out_split_that_takes_every_row_says_so(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", rows([SHORT]))
    with pytest.raises(DataError) as raised:
        training_data(config(path, eval_fraction=0.6), tokenizer, seed=0)
    assert str(raised.value) == (
        "no training examples left. one.jsonl: 1 row read: 1 held out. To keep some: lower data.eval_fraction "
        "(now 0.6) or hold out rows of another file with data.eval_path")


def test_rows_lost_to_the_length_limit_and_the_split_together_are_both_named(tokenizer, tmp_path):
    outputs = [LONG] * 20
    for held in _held_out_records(20, 0.1, [0, 0]):  # the rows seed 0 holds out keep a short answer
        outputs[held] = SHORT
    path = write_jsonl(tmp_path / "rows.jsonl", rows(outputs))
    with pytest.raises(DataError, match=r"rows\.jsonl: 20 rows read: 18 dropped \(response alone too long for "
                                        r"data\.max_seq_len=40: 18\), 2 held out\. To keep some: raise "
                                        r"data\.max_seq_len \(now 40\); lower data\.eval_fraction \(now 0\.1\)"):
        training_data(config(path, eval_fraction=0.1, max_seq_len=40), tokenizer, seed=0)


def test_rows_skipped_leaked_or_weighted_away_are_named_too(tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "x", "output": ', {"instruction": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: 2 rows read: 2 skipped \(invalid JSON: 1, missing output: 1\)"
                                        r"\. To keep some: fix the skipped rows"):
        training_data(config(bad, format="alpaca", on_bad_row="skip"), tokenizer, seed=0)

    twice = write_jsonl(tmp_path / "twice.jsonl", [rows([SHORT])[0]] * 2)
    with pytest.raises(DataError, match=r"twice\.jsonl: 2 rows read: 1 held out, 1 dropped for repeating a held-out "
                                        r"question\. To keep some: .*set data\.drop_leaked=false"):
        training_data(config(twice, eval_fraction=0.5), tokenizer, seed=0)

    few = write_jsonl(tmp_path / "few.jsonl", rows([SHORT, SHORT]))
    mixture = [DataSource(str(few), weight=0.1)]
    with pytest.raises(DataError, match=r"few\.jsonl: 2 rows read: 2 left out by weight 0\.1\. To keep some: raise "
                                        r"the dataset's weight in data\.mixture"):
        training_data(DataConfig(mixture=mixture, eval_fraction=0.0, cache=False), tokenizer, seed=0)


def test_held_out_rows_all_dropped_are_not_said_to_round_to_none(tokenizer, tmp_path):
    outputs = [SHORT] * 20
    for held in _held_out_records(20, 0.1, [0, 0]):
        outputs[held] = LONG
    path = write_jsonl(tmp_path / "rows.jsonl", rows(outputs))
    train, held_out, stats = build_datasets(config(path, eval_fraction=0.1, max_seq_len=40), tokenizer, seed=0)
    assert len(train) == 18 and len(held_out) == 0
    assert "no held-out example (the rows held out were all dropped or skipped: see above): nothing is evaluated " \
           "and no checkpoint is marked best" in stats["notes"]


# ------------------------------------------------------------------------------ columns no field reads


DOLLY = [{"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summary"},
         {"instruction": "Say hi.", "context": "", "response": "hi", "category": "open_qa"}]


def unread_notes(stats) -> list[str]:
    return [note for note in stats["notes"] if "no field reads" in note]


def test_a_column_left_out_of_data_columns_is_noted_with_the_mapping_to_add(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [{k: v for k, v in row.items() if k != "category"} for row in DOLLY])
    _, _, stats = build_datasets(config(path, columns={"response": "output"}), tokenizer, seed=0)
    assert unread_notes(stats) == [
        "dolly.jsonl: column 'context' (a value in 1 row) is in the data but no field reads it; every row's input "
        "is empty: data.columns.context=input maps it there"]
    assert "note: dolly.jsonl: column 'context'" in str(stats), "printed in the data table"
    _, _, stats = build_datasets(config(path, columns={"response": "output", "context": "input"}), tokenizer, seed=0)
    assert unread_notes(stats) == []


def test_several_unread_columns_are_listed_and_a_cached_store_still_notes_them(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    data = config(path, columns={"response": "output"}, cache=True)
    for _ in ("miss", "hit"):
        _, _, stats = build_datasets(data, tokenizer, seed=0)
        assert unread_notes(stats) == [
            "dolly.jsonl: columns 'category' (a value in 2 rows), 'context' (a value in 1 row) are in the data but "
            "no field reads them; every row's input is empty: data.columns.<column>=input maps the one that "
            "belongs there"]
    _, _, stats = build_datasets(config(path, columns={"response": "output", "context": "input"}), tokenizer, seed=0)
    assert unread_notes(stats) == ["dolly.jsonl: column 'category' (a value in 2 rows) is in the data but no field "
                                   "reads it"], "an input is read: no mapping suggested"


@pytest.mark.parametrize("row", [
    {"instruction": "Say hi.", "input": "", "output": "hi", "id": 3, "text": "### Instruction: Say hi. hi"},
    {"instruction": "Say hi.", "output": "hi", "context": "", "notes": None, "tags": []},
    {"id": "seed_task_1", "name": "hi", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}],
     "is_classification": False},
    {"id": "chat-1", "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
], ids=["alpaca with id and text", "empty values", "self-instruct seed task", "chat with id"])
def test_the_usual_extra_columns_and_empty_ones_are_not_noted(row, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    _, _, stats = build_datasets(config(path), tokenizer, seed=0)
    assert unread_notes(stats) == []


def test_raising_data_max_rows_is_suggested_only_where_the_cap_cut_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", rows([LONG] * 5))
    with pytest.raises(DataError) as uncapped:
        training_data(config(path, max_seq_len=34, max_rows=1000), tokenizer, seed=0)
    assert "data.max_rows" not in str(uncapped.value)  # 5 rows under a cap of 1,000: raising it cannot help
    with pytest.raises(DataError, match=r"raise data\.max_rows \(now 3\)"):
        training_data(config(path, max_seq_len=34, max_rows=3), tokenizer, seed=0)
