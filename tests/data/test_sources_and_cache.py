"""Sources read as their authors meant them (CSV cells as text, a byte-order mark ignored, an empty
file named as such), and a cached store that cannot be read replaced rather than crashing every run
(but kept when it is the machine, not the store, that fails for a moment: too many open files)."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from trainer.config import DataConfig, DataSource
from trainer.data import store as store_module
from trainer.data.formats import DataError
from trainer.data.pipeline import build_datasets, load_source, read_rows
from trainer.data.store import Store, StoreWriter, UnreadableStore

ROW = {"instruction": "Say hi.", "input": "", "output": "hello"}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **{"eval_fraction": 0.0, "cache": False, "max_seq_len": 256, **overrides})


def cut_short(store_path: Path) -> None:
    """Lose the last offset, as a copy cut short or a full disk would: the header promises more."""
    offsets = store_path / "offsets.npy"
    offsets.write_bytes(offsets.read_bytes()[:-8])


def empty_store(path: Path) -> Path:
    return StoreWriter(path).finish({"name": "empty", "format": "alpaca", "records": 0, "outcomes": {}})


# ------------------------------------------------------------------------------ the cache


def test_a_cached_store_cut_short_is_rebuilt_then_hit(tokenizer, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**ROW, "output": f"hello {i}"}) + "\n" for i in range(5)))
    data = config(path, cache=True)
    first = load_source(DataSource(str(path)), data, tokenizer, workers=1)
    assert first.cache == "miss"
    cut_short(first.store.path)

    again = load_source(DataSource(str(path)), data, tokenizer, workers=1)
    assert again.cache == "miss" and len(again.store) == 5 and again.store.path == first.store.path
    assert f"the cached tokenised data at {first.store.path} cannot be read" in capsys.readouterr().out
    assert not list(first.store.path.parent.glob(".*.unreadable")), "the unreadable copy is deleted"
    assert load_source(DataSource(str(path)), data, tokenizer, workers=1).cache == "hit"


def test_a_cache_hit_names_the_dataset_as_this_run_does(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n")
    monkeypatch.chdir(tmp_path)
    first = load_source(DataSource("d.jsonl"), config("d.jsonl", cache=True), tokenizer, workers=1)
    assert first.cache == "miss" and first.name == "d.jsonl"
    absolute = str(tmp_path / "d.jsonl")
    again = load_source(DataSource(absolute), config(absolute, cache=True), tokenizer, workers=1)
    assert again.cache == "hit" and again.name == absolute  # not the first run's relative spelling


def test_the_cache_key_ignores_padding_and_truncation_left_set_on_the_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    from trainer.data.cache import cache_key

    fresh = AutoTokenizer.from_pretrained(tiny_base)
    before = cache_key("source", fresh, {})
    fresh(["a", "a longer text"], padding=True, truncation=True, max_length=3)  # leaves both set on the backend
    assert fresh.backend_tokenizer.padding is not None and fresh.backend_tokenizer.truncation is not None
    assert cache_key("source", fresh, {}) == before
    fresh.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert cache_key("source", fresh, {}) != before  # what the examples are tokenised with still counts


def test_an_unreadable_store_names_its_directory_and_what_to_do(tmp_path):
    path = empty_store(tmp_path / "store")
    cut_short(path)
    message = f"{re.escape(str(path))}: cannot read this tokenised store .*delete the directory"
    with pytest.raises(UnreadableStore, match=message):
        Store(path)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM])
def test_a_store_that_cannot_be_opened_for_the_machines_reasons_is_kept(tokenizer, tmp_path, monkeypatch, code):
    # Too many open files, no memory: the files are fine, so the cache is neither discarded nor rebuilt.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**ROW, "output": f"hello {i}"}) + "\n" for i in range(5)))
    data = config(path, cache=True)
    stored = load_source(DataSource(str(path)), data, tokenizer, workers=1).store.path
    real_load = np.load

    def failing_load(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]))

    monkeypatch.setattr(np, "load", failing_load)
    with pytest.raises(DataError, match=f"{re.escape(str(stored))}: cannot open this tokenised store now .*it is kept"):
        load_source(DataSource(str(path)), data, tokenizer, workers=1)
    monkeypatch.setattr(np, "load", real_load)
    assert load_source(DataSource(str(path)), data, tokenizer, workers=1).cache == "hit"
    assert load_source(DataSource(str(path)), data, tokenizer, workers=1).store.path == stored


def test_a_finished_store_takes_the_place_of_an_unreadable_one(tmp_path):
    path = empty_store(tmp_path / "store")
    cut_short(path)
    assert len(Store(empty_store(path))) == 0
    assert [entry.name for entry in tmp_path.iterdir()] == ["store"], "neither copy is left beside it"


def test_an_unreadable_store_that_cannot_be_moved_says_which_directory_to_delete(tmp_path, monkeypatch):
    path = empty_store(tmp_path / "store")
    cut_short(path)

    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_module, "discard", refuse)
    message = f"{re.escape(str(path))}: a tokenised store there cannot be read .*delete that directory"
    with pytest.raises(OSError, match=message):
        empty_store(path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["store"], "the new copy is cleaned up"


# ------------------------------------------------------------------------------ CSV cells are text


def test_csv_numbers_stay_text_as_written(tokenizer, tmp_path):
    answers = tmp_path / "answers.csv"
    answers.write_text("instruction,input,output\nWhat is 2+3?,,5\nWhat is 4+4?,,8\nWhat is 9+1?,,10\n")
    assert [row["output"] for row in read_rows(str(answers))] == ["5", "8", "10"]
    for policy in ("error", "skip"):
        train, _, stats = build_datasets(config(answers, on_bad_row=policy), tokenizer, seed=0)
        assert len(train) == 3 and stats["skipped"] == 0
    # A blank cell in a column of numbers: "3" stays "3" (not the float 3.0), the blank an empty
    # input; an answer "NA" stays text.
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("instruction,input,output\nDouble it.,3,six\nDouble it.,4,eight\nSay hi.,,hello\n"
                       "Abbreviate not applicable.,,NA\n")
    assert read_rows(str(doubled)) == [{"instruction": "Double it.", "input": "3", "output": "six"},
                                       {"instruction": "Double it.", "input": "4", "output": "eight"},
                                       {"instruction": "Say hi.", "input": "", "output": "hello"},
                                       {"instruction": "Abbreviate not applicable.", "input": "", "output": "NA"}]


def test_csv_rows_with_an_empty_or_missing_required_field_are_named(tmp_path):
    blank = tmp_path / "blank.csv"
    blank.write_text("instruction,input,output\nSay hi.,,hello\nSay bye.,,\n")
    with pytest.raises(DataError, match=r"blank\.csv: row 2: field 'output' is empty"):
        read_rows(str(blank))
    assert read_rows(str(blank), on_bad_row="skip") == [ROW]
    no_output = tmp_path / "no_output.csv"
    no_output.write_text("instruction,input\nSay hi.,\n")
    with pytest.raises(DataError, match=r"no_output\.csv: row 1: field 'output' is missing"):
        read_rows(str(no_output), format="alpaca")


# ------------------------------------------------------------------------------ BOM and empty files


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    line = json.dumps(ROW)
    lines, array = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    lines.write_text(f"{line}\n{line}\n", encoding="utf-8-sig")
    array.write_text(f"[{line}]", encoding="utf-8-sig")
    assert read_rows(str(lines)) == [ROW, ROW]
    assert read_rows(str(array)) == [ROW]


def test_a_folder_of_rows_is_read_and_a_folder_of_text_files_is_named(tokenizer, tmp_path):
    """`datasets` reads a folder by its files' type: .jsonl rows are rows; a .txt file's lines would be
    one 'text' column, which no format reads."""
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "part.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    train, _, _ = build_datasets(config(rows), tokenizer, seed=0)
    assert len(train) == 2
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Reverse the word cat.\ntac\n")
    with pytest.raises(DataError, match=f"{re.escape(str(notes))}: a folder whose files `datasets` reads as plain "
                                        f"text .* give a data file"):
        build_datasets(config(notes), tokenizer, seed=0)
    # A folder of rows whose one column is 'text' (a pretraining-style set) is not said to be text files.
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "part.jsonl").write_text(json.dumps({"text": "### Human: hi ### Assistant: hello"}) + "\n")
    with pytest.raises(DataError, match=r"cannot tell the format from its columns \['text'\]"):
        build_datasets(config(texts), tokenizer, seed=0)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                           ("nothing.json", ""), ("blank.json", " \n"), ("empty.csv", ""),
                                           ("header.csv", "instruction,input,output\n")])
@pytest.mark.parametrize("format", ["auto", "alpaca"])
def test_an_empty_data_file_is_named_as_having_no_records(name, content, format, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: has no records"):
        build_datasets(config(path, format=format), tokenizer, seed=0)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: has no records"):
        read_rows(str(path), format=format)
