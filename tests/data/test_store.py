"""The tokenised store: written a chunk at a time by one or several processes into the same bytes,
equal to tokenising the file in memory, read back through memory maps as index arrays; bad rows in
any chunk named by file and row; a store that is not cached still leaves nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from trainer.config import DataConfig, DataSource
from trainer.data import pipeline
from trainer.data.building import build_store
from trainer.data.encoding import tokenize_rows
from trainer.data.formats import DataError
from trainer.data.leakage import question_id
from trainer.data.pipeline import build_datasets, held_out_rows
from trainer.data.sources import locate, read_source
from trainer.data.store import Examples, Store


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def rows(count: int, start: int = 0) -> list[dict]:
    """Distinct questions of varied lengths, some long enough to be cut at max_seq_len=80."""
    return [{"instruction": f"Repeat the word {i} " + "again " * (i % 7), "input": "x " * (i % 23),
             "output": f"word {i} " * (1 + i % 5) * (6 if i % 13 == 0 else 1)} for i in range(start, start + count)]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def files(store: Store) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(store.path.iterdir())}


def build(path: Path, tokenizer, out: Path, workers: int, chunk_rows: int = 8, **settings) -> Store:
    config = DataConfig(path=str(path), max_seq_len=80, **settings)
    return build_store(locate(str(path)), DataSource(str(path)), config, tokenizer, out, workers, chunk_rows)


def test_the_store_is_the_same_bytes_for_one_or_several_workers_and_equals_the_file_tokenised_whole(
        tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(61))
    one = build(path, tokenizer, tmp_path / "one", workers=1)
    two = build(path, tokenizer, tmp_path / "two", workers=2)
    assert files(one) == files(two)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary directories were renamed into place"

    # The examples are those of the file read and tokenised in one piece, in memory.
    config = DataConfig(path=str(path), max_seq_len=80)
    source = read_source(locate(str(path)))
    expected, outcomes = tokenize_rows(tokenizer, source.rows, source.format, config, source.name)
    assert list(Examples.whole(two)) == expected and len(expected) < 61  # some rows were dropped as too long
    assert two.info["outcomes"] == dict(outcomes) and two.info["records"] == 61
    # The per-example arrays say what the examples hold.
    assert two.lengths().tolist() == [len(e.input_ids) for e in expected]
    assert two.trained.tolist() == [sum(label != -100 for label in e.labels[1:]) for e in expected]
    assert two.questions.tolist() == [question_id(row.fields) for row in source.rows
                                      if row.record in {e.row_id for e in expected}]
    # Read through memory maps of the store's files, read-only.
    assert str(two.path / "input_ids.npy") in Path("/proc/self/maps").read_text()
    assert not two.input_ids.flags.writeable and not two.input_ids.flags.owndata


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_row_in_a_later_chunk_is_named_by_file_and_row(tokenizer, tmp_path, workers):
    lines = [*rows(29), {"instruction": "x", "output": 3}, *rows(10, 29), '{"instruction": ', *rows(5, 39)]
    lines.insert(35, "")  # a blank line after the bad row: the later rows' line numbers differ
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=rf"{path}: row 30: field 'output' is int, not a string"):
        build(path, tokenizer, tmp_path / "store", workers)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"], "no store and no temporary directory left"
    store = build(path, tokenizer, tmp_path / "store", workers, on_bad_row="skip")
    assert store.info["records"] == 46
    assert {why: n for why, n in store.info["outcomes"].items() if why.startswith("skipped")} == \
        {"skipped: output not a string": 1, "skipped: invalid JSON": 1}
    assert 29 not in store.row_ids.tolist() and 40 not in store.row_ids.tolist()
    valid = [line for line in lines if isinstance(line, dict) and isinstance(line["output"], str)]
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [*valid[:39], "{}"])
    with pytest.raises(DataError, match=rf"{fixed}: row 40: field 'instruction' is missing"):
        build(fixed, tokenizer, tmp_path / "other", workers)


def test_a_view_indexes_slices_and_joins_without_copying_the_tokens(tokenizer, tmp_path):
    first = build(write_jsonl(tmp_path / "a.jsonl", rows(20)), tokenizer, tmp_path / "a", workers=1)
    second = build(write_jsonl(tmp_path / "b.jsonl", rows(10, 100)), tokenizer, tmp_path / "b", workers=1)
    a, b = Examples.whole(first), Examples.whole(second, row_offset=20)
    joined = Examples.join([a[::2], b.take(np.array([3, 0]))])
    expected = [*list(a)[::2], b[3], b[0]]
    assert list(joined) == expected and joined == expected and len(joined) == len(expected)
    assert joined[-1].row_id == second.row_ids[0] + 20
    assert joined.row_ids().tolist() == [e.row_id for e in expected]
    assert joined.lengths().tolist() == [len(e.input_ids) for e in expected]
    assert joined.questions().tolist() == [e.question for e in expected]
    assert joined[1:3] == expected[1:3] and joined[[0, 2]] == [expected[0], expected[2]]
    assert joined.positions.nbytes == 8 * len(joined), "a view holds positions, not examples"


def test_uncached_data_leaves_no_store_behind_and_held_out_rows_come_back_from_their_files(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", rows(30))
    second = tmp_path / "b.json"
    second.write_text(json.dumps(rows(20, 500)))
    mixture = [DataSource(str(first)), DataSource(str(second), weight=1.5)]
    config = DataConfig(mixture=mixture, eval_fraction=0.2, cache=False, max_seq_len=80)
    tokenized = Path(os.environ["QLORA_TRAINER_CACHE"]) / "tokenized"
    before = set(tokenized.iterdir()) if tokenized.exists() else set()
    train, held_out, stats = build_datasets(config, tokenizer, seed=5)
    assert stats["cache"] == "off" and (set(tokenized.iterdir()) if tokenized.exists() else set()) == before
    assert len(train) == stats["train_examples"] > 0 and list(train)[0].input_ids  # readable once deleted
    # Each held-out example's row, read back from its own file (row ids count on across the mixture).
    assert {e.row_id >= 30 for e in held_out} == {False, True}
    assert [question_id(row) for row in held_out_rows(config, held_out)] == [e.question for e in held_out]
    assert [question_id(row) for row in held_out_rows(config, held_out[::3])] == [e.question for e in held_out[::3]]


def test_a_store_that_cannot_be_cached_is_built_elsewhere(tokenizer, tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    monkeypatch.setattr(pipeline.cache, "path_for", lambda key: Path("/proc/no-such-place") / key)
    train, _, stats = build_datasets(DataConfig(path=str(path), eval_fraction=0.0, max_seq_len=80), tokenizer, seed=0)
    assert "could not cache the tokenised data" in capsys.readouterr().out
    assert stats["cache"] == "miss" and len(train) == stats["train_examples"] > 0
