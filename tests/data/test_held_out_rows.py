"""Held-out examples traced back to the rows they came from (`held_out_rows`), and training rows of a
mixture named by file in the non-finite error: a task's instances told apart when some were dropped
or sampled away, a cached store reused by a run that names its file by another relative path."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.config import DataConfig, DataSource
from trainer.data.formats import DataError
from trainer.data.leakage import question_id
from trainer.data.pipeline import build_datasets, held_out_rows, rows_by_file
from trainer.runtime.health import nonfinite_message


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca(count: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(start, start + count)]


def questions(rows: list[dict]) -> list[int]:
    return [question_id(row) for row in rows]


def test_a_dropped_instance_does_not_shift_the_instances_after_it(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca(20))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Reverse the word.", "instances": [
        {"input": "cat", "output": "tac"},
        {"input": "a very long input " * 40, "output": "x"},  # over max_seq_len: dropped
        {"input": "dog", "output": "god"}]}])
    config = DataConfig(path=str(train), eval_path=str(held), cache=False, max_seq_len=64, on_too_long="drop")
    _, held_out, stats = build_datasets(config, tokenizer, seed=0)
    assert len(held_out) == 2 and stats["dropped"] == 1
    rows = held_out_rows(config, held_out)
    assert [row["input"] for row in rows] == ["cat", "dog"]
    assert questions(rows) == [example.question for example in held_out]


def test_a_file_cut_short_during_the_run_is_named_when_its_held_out_rows_are_read(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca(40))
    config = DataConfig(path=str(path), eval_fraction=0.25, cache=False, max_seq_len=64)
    _, held_out, _ = build_datasets(config, tokenizer, seed=0)
    write_jsonl(path, alpaca(5))  # the held-out rows are read back later, from the file as it is then
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: fewer rows than the 40 .* the file changed "
                                        f"during this run; run again"):
        held_out_rows(config, held_out)


def test_instances_sampled_away_by_max_eval_rows_leave_the_others_on_their_own_rows(tokenizer, tmp_path):
    tasks = [{"instruction": f"Spell the number {task}.",
              "instances": [{"input": f"{task}-{number}", "output": f"{task} {number}"} for number in range(5)]}
             for task in range(12)]
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config = DataConfig(path=str(path), eval_fraction=0.5, max_eval_rows=7, cache=False, max_seq_len=64)
    _, held_out, stats = build_datasets(config, tokenizer, seed=3)
    assert len(held_out) == 7
    # 6 tasks x 5 instances held out, 7 evaluated: the others are out of training too, and the notes say so.
    assert ("23 of the 30 held-out examples (data.eval_fraction=0.5) are over data.max_eval_rows=7: neither "
            "trained on nor evaluated" in " ".join(stats["notes"]))
    rows = held_out_rows(config, held_out)
    assert questions(rows) == [example.question for example in held_out]
    # The sample kept some task's later instances without its first ones: the case being checked.
    assert any(not row["input"].endswith("-0") for row in rows)


def test_a_cached_store_reused_from_another_directory_reads_this_runs_file(tokenizer, tmp_path, monkeypatch):
    # The same file named d.jsonl from a/, then a/d.jsonl from its parent, which has a d.jsonl of its own.
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "d.jsonl", alpaca(10))
    write_jsonl(tmp_path / "d.jsonl", alpaca(10, start=500))
    settings = {"eval_fraction": 0.5, "cache": True, "max_seq_len": 64}
    monkeypatch.chdir(tmp_path / "a")
    _, _, first = build_datasets(DataConfig(path="d.jsonl", **settings), tokenizer, seed=0)
    monkeypatch.chdir(tmp_path)
    config = DataConfig(path="a/d.jsonl", **settings)
    _, held_out, second = build_datasets(config, tokenizer, seed=0)
    assert first["cache"] == "miss" and second["cache"] == "hit"
    assert questions(held_out_rows(config, held_out)) == [example.question for example in held_out]


def test_the_nonfinite_error_names_each_rows_own_file_and_row_in_a_mixture(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", alpaca(30))
    second = write_jsonl(tmp_path / "second.jsonl", alpaca(20, start=100))
    config = DataConfig(mixture=[DataSource(str(first)), DataSource(str(second))], eval_fraction=0.0, cache=False,
                        max_seq_len=64)
    train, _, _ = build_datasets(config, tokenizer, seed=0)
    in_first, in_second = train[4], train[len(train) - 1]
    assert in_first.row_id < 30 <= in_second.row_id
    second_row = in_second.row_id - 30  # 0-based, within second.jsonl
    assert question_id(alpaca(20, start=100)[second_row]) == in_second.question

    message = nonfinite_message(7, 1e-4, float("nan"), None,
                                rows_by_file(train, config, [in_first.row_id, in_second.row_id]))
    assert (f"{first}: row {in_first.row_id + 1}; {second}: row {second_row + 1}." in message), message
    assert "tasks.jsonl" not in message  # not data.path, which a mixture leaves at its default

    # Rows of one file of the mixture: the usual line, with that file's own row numbers.
    message = nonfinite_message(7, 1e-4, float("nan"), None, rows_by_file(train, config, [in_second.row_id]))
    assert f"The batch held rows {second_row + 1} of {second} (1-based)." in message, message


def test_an_eval_path_over_max_eval_rows_says_how_many_are_scored(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca(20))
    held = write_jsonl(tmp_path / "eval.jsonl", alpaca(30, start=100))
    config = DataConfig(path=str(train), eval_path=str(held), max_eval_rows=8, cache=False, max_seq_len=64)
    _, held_out, stats = build_datasets(config, tokenizer, seed=0)
    assert len(held_out) == stats["eval_examples"] == 8
    assert [summary["eval"] for summary in stats["datasets"]] == [0, 30]  # the file's examples; the note says 8
    assert ("data.eval_path has 30 examples; 8 of them (a seeded sample) are scored at each evaluation, as "
            "data.max_eval_rows=8 caps them; raise data.max_eval_rows to score more" in " ".join(stats["notes"]))
    assert questions(held_out_rows(config, held_out)) == [example.question for example in held_out]
