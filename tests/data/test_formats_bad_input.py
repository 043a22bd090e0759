"""Bad input named for what it is: data.columns renaming a column onto one the row already has, half
a UTF-16 pair in a field, a .jsonl file that holds no JSON object (a list, Python's repr of dicts) or
stops being UTF-8 partway, suffixes written in capitals, and a data.format given by hand that the
columns are not (named once with the format they are, not as a bad first row)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.config import DataConfig
from trainer.data.formats import DataError, settle_format, validate_records
from trainer.data.pipeline import build_datasets, read_rows
from trainer.data.sources import locate, read_source

ROW = {"instruction": "Say hi.", "input": "", "output": "hello"}
LONE_HIGH = "\ud83d"  # the first half of 😀's UTF-16 pair (json.loads gives it for "\\ud83d")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **{"eval_fraction": 0.0, "cache": False, "max_seq_len": 256, **overrides})


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines (a str as the line itself), escaped as json.dumps escapes: a lone surrogate
    is written as the six characters \\ud83d, as a file from another tool would hold it."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------ data.columns onto a column the row has


COLLIDE = {"instruction": "Summarise.", "response": "A long, good summary.", "output": "B"}


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_mapping_onto_a_column_the_row_has_is_refused_naming_both(on_bad_row, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "collide.jsonl", [COLLIDE])
    with pytest.raises(DataError, match=rf"collide\.jsonl: row 1: data\.columns maps 'response' to 'output', but the "
                                        rf"row also has a column 'output': .*Remove or rename one of them"):
        build_datasets(config(path, columns={"response": "output"}, on_bad_row=on_bad_row), tokenizer, seed=0)


def test_the_column_mapped_onto_may_itself_be_mapped_away(tmp_path):
    path = write_jsonl(tmp_path / "swap.jsonl", [COLLIDE])
    rows = read_rows(str(path), columns={"response": "output", "output": "input"})
    assert rows == [{"instruction": "Summarise.", "input": "B", "output": "A long, good summary."}]


def test_two_columns_mapped_onto_one_field_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"instruction": "Q", "answer": "A", "response": "B"}])
    with pytest.raises(DataError, match=r"two\.jsonl: row 1: data\.columns maps 'answer' and 'response' to the "
                                        r"same field 'output', and the row has both"):
        read_rows(str(path), columns={"answer": "output", "response": "output"})


def test_a_csv_file_and_a_saved_dataset_are_refused_at_row_1(tmp_path):
    import datasets

    csv = tmp_path / "collide.csv"
    csv.write_text("instruction,response,output\nSummarise.,\"A long, good summary.\",B\n")
    with pytest.raises(DataError, match=r"collide\.csv: row 1: data\.columns maps 'response' to 'output'"):
        read_rows(str(csv), columns={"response": "output"})
    datasets.Dataset.from_list([COLLIDE]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: row 1: data\.columns maps 'response' to 'output'"):
        read_rows(str(tmp_path / "saved"), columns={"response": "output"})


def test_a_collision_after_the_first_chunk_is_caught_too(tmp_path):
    """The format is settled on the first chunk; a .jsonl row further on may have other columns."""
    path = write_jsonl(tmp_path / "late.jsonl", [{"instruction": "Q", "response": "A"}] * 2 + [COLLIDE])
    records = list(locate(str(path)).read(None))
    columns = {"response": "output"}
    assert settle_format(str(path), records[:2], "auto", columns) == "alpaca"
    assert len(validate_records(str(path), records[:2], 0, "alpaca", columns, "skip")[0]) == 2
    with pytest.raises(DataError, match=r"late\.jsonl: row 3: data\.columns maps 'response' to 'output'"):
        validate_records(str(path), records[2:], 2, "alpaca", columns, "skip")


# ------------------------------------------------------------------------------ half a UTF-16 pair


def test_a_lone_surrogate_is_a_bad_row_named_by_field_or_skipped(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "surrogate.jsonl",
                       [ROW, {"instruction": f"Say hi {LONE_HIGH}", "output": "hi \ud83d\ude00"}, ROW])
    with pytest.raises(DataError, match=r"surrogate\.jsonl: row 2: field 'instruction' holds an unpaired surrogate "
                                        r"'\\ud83d' at character 8 .*data\.on_bad_row: skip"):
        build_datasets(config(path), tokenizer, seed=0)
    train, _, stats = build_datasets(config(path, on_bad_row="skip"), tokenizer, seed=0)
    assert [example.row_id for example in train] == [0, 2]
    assert stats["datasets"][0]["outcomes"] == {"skipped: unpaired surrogate": 1}


def test_a_whole_pair_is_text_like_any_other(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "emoji.jsonl", [{"instruction": "Smile.", "output": "\ud83d\ude00"}])
    assert read_rows(str(path)) == [{"instruction": "Smile.", "input": "", "output": "😀"}]
    train, _, _ = build_datasets(config(path), tokenizer, seed=0)
    assert len(train) == 1


def test_a_lone_surrogate_in_a_chat_message_or_an_instance_is_named(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo \ude00"}]}])
    with pytest.raises(DataError, match=r"row 1: message 2: 'content' holds an unpaired surrogate '\\ude00'"):
        read_rows(str(chat))
    task = {"instruction": "Name one.", "instances": [{"output": "red"}, {"input": LONE_HIGH, "output": "blue"}]}
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [task])
    with pytest.raises(DataError, match=r"row 1, instance 2: field 'input' holds an unpaired surrogate"):
        read_rows(str(tasks))


# ------------------------------------------------------------------------------ .jsonl files that hold no object


ROWS = [ROW, {**ROW, "output": "hi"}]


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty"])
def test_a_json_list_saved_as_jsonl_is_told_to_be_a_json_file(indent, on_bad_row, tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS, indent=indent) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl: row 1: opens with '\[' \(a JSON list\), not an object: a file "
                                        r"holding one JSON list of rows should be named \.json"):
        build_datasets(config(path, on_bad_row=on_bad_row), tokenizer, seed=0)


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_python_dicts_saved_as_jsonl_are_named_as_not_json(on_bad_row, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "repr.jsonl", [repr(row) for row in ROWS])
    with pytest.raises(DataError, match=r"repr\.jsonl: row 1: not valid JSON at column 2: Expecting property name "
                                        r"enclosed in double quotes, and no record of the first 2 is an object; "
                                        r"single-quoted strings are Python's repr"):
        build_datasets(config(path, on_bad_row=on_bad_row), tokenizer, seed=0)


# json's own messages, some of which end in "at" (it appends the position to str(error)).
MALFORMED = [('{"instruction": "cut off', "column 17: Unterminated string starting"),
             ('{"instruction": "a\tb", "output": "x"}', "column 19: Invalid control character"),
             ('{"instruction": "a" "output": "x"}', "column 21: Expecting ',' delimiter"),
             ('{"instruction": "a", "output": "x"} {}', "column 37: Extra data"),
             ('{"instruction": "a\\q", "output": "x"}', "column 19: Invalid \\escape"),
             ('{"instruction": "a",}', "column 21: Expecting property name enclosed in double quotes"),
             ('{"instruction": }', "column 17: Expecting value")]


@pytest.mark.parametrize("line, problem", MALFORMED, ids=[problem.split(": ")[1] for _, problem in MALFORMED])
def test_a_malformed_jsonl_line_is_named_by_row_and_column_without_a_word_twice(line, problem, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW, line])
    with pytest.raises(DataError) as raised:
        build_datasets(config(path), tokenizer, seed=0)
    message = str(raised.value)
    assert message.startswith(f"{path}: row 2: not valid JSON at {problem} (data.on_bad_row: skip"), message
    assert not re.search(r"\b(\w+) \1\b", message), message


def test_a_malformed_json_file_is_named_by_line_and_column(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "Say hi.", "output": "hello"},\n  {"instruction": "cut off')
    with pytest.raises(DataError, match=r"rows\.json: not valid JSON at line 3 column 19: Unterminated string "
                                        r"starting$"):  # a cut-off list: nothing about .jsonl
        read_rows(str(path))
    path.write_text('{"instruction": "Say hi.", "output": "hello"}\n{"instruction": "Sing.", "output": "la"}\n')
    with pytest.raises(DataError, match=r"rows\.json: not valid JSON at line 2 column 1: Extra data; a file of one "
                                        r"JSON object per line should be named \.jsonl$"):
        read_rows(str(path))


def test_a_file_with_some_objects_still_names_its_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ["[1]", {"prompt": "Q", "response": "A"}])
    with pytest.raises(DataError, match=r"cannot tell the format from its columns \['prompt', 'response'\]"):
        build_datasets(config(path), tokenizer, seed=0)


# ------------------------------------------------------------------------------ not UTF-8 partway


def latin_at(path: Path, bad_row: int, blank_lines: int = 0) -> Path:
    """UTF-8 rows with one cp1252 'é' in row `bad_row`, far past the decoder's first buffer."""
    lines = [json.dumps({"instruction": f"q{number}", "output": "a"}).encode() for number in range(1, bad_row)]
    lines += [b""] * blank_lines
    lines += ['{"instruction": "café", "output": "x"}'.encode("cp1252"), b'{"instruction": "z", "output": "a"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("blank_lines, where", [(0, "row 3001"), (2, r"row 3001 \(line 3003\)")])
def test_a_jsonl_byte_that_is_not_utf8_names_its_row_and_line(blank_lines, where, tmp_path):
    path = latin_at(tmp_path / "latin.jsonl", 3001, blank_lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {where}: not UTF-8 text \(byte 0xe9 at character "
                                        rf"21 of the line; saved as Latin-1 or cp1252\?\); re-save it as UTF-8 "
                                        rf"\(data.on_bad_row: skip leaves such rows out and counts them\)$"):
        read_rows(str(path))


def test_a_row_that_is_not_utf8_is_a_bad_row_skip_leaves_out_and_counts(tmp_path):
    """Not the whole file: the rows before and after it are read, and an earlier bad row is named first."""
    path = latin_at(tmp_path / "latin.jsonl", 5)
    source = read_source(locate(str(path)), "auto", None, None, "skip")
    assert [row.fields["instruction"] for row in source.rows] == ["q1", "q2", "q3", "q4", "z"]
    assert source.bad == {"not UTF-8": 1}
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], b'{"instruction": "no output"}', *lines[1:]]) + b"\n")
    with pytest.raises(DataError, match=r"latin\.jsonl: row 2: field 'output' is missing"):
        read_rows(str(path))


def test_a_json_byte_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}\n]\n')
    with pytest.raises(DataError, match=r"latin\.json: cannot read the data file: line 3: not UTF-8 text \(byte 0xe9"):
        list(locate(str(path)).read(None))


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "wide.jsonl"
    path.write_bytes(json.dumps(ROW).encode("utf-16"))
    with pytest.raises(DataError, match=r"wide\.jsonl: row 1: not UTF-8 text .*saved as UTF-16, by its byte-order "
                                        r"mark\); re-save it as UTF-8"):
        read_rows(str(path))


# ------------------------------------------------------------------------------ suffixes in capitals


def test_suffixes_in_capitals_are_files_not_hub_ids(tmp_path):
    jsonl = write_jsonl(tmp_path / "ROWS.JSONL", ROWS)
    json_list = tmp_path / "ROWS.JSON"
    json_list.write_text(json.dumps(ROWS))
    csv = tmp_path / "ROWS.CSV"
    csv.write_text("instruction,output\nSay hi.,hello\n")
    assert len(read_rows(str(jsonl))) == len(read_rows(str(json_list))) == 2
    assert read_rows(str(csv)) == [ROW]


# ------------------------------------------------------------------------------ empty cells and nulls


def test_an_empty_csv_cell_is_named_empty_not_missing(tokenizer, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,input,output\nAdd 1 and 1.,,2\nAdd 2 and 2.,,\n")
    with pytest.raises(DataError, match=r"rows\.csv: row 2: field 'output' is empty \(a null, an empty cell, or not given in this row of a table\) "
                                        r"\(data\.on_bad_row: skip leaves such rows out"):
        read_rows(str(csv))
    _, _, stats = build_datasets(config(csv, on_bad_row="skip"), tokenizer, seed=0)
    assert stats["datasets"][0]["outcomes"] == {"skipped: empty output": 1}


def test_a_json_null_is_named_empty_and_an_absent_field_missing(tmp_path):
    path = write_jsonl(tmp_path / "nulls.jsonl", [ROW, {**ROW, "output": None}])
    with pytest.raises(DataError, match=r"nulls\.jsonl: row 2: field 'output' is empty \(a null, an empty cell, or not given in this row of a table\)"):
        read_rows(str(path))
    path = write_jsonl(tmp_path / "absent.jsonl", [ROW, {"instruction": "Say hi."}])
    with pytest.raises(DataError, match=r"absent\.jsonl: row 2: field 'output' is missing \(row keys: \['instruction'\]"):
        read_rows(str(path))


@pytest.mark.parametrize("given, record, said", [
    ("chat", ROW, "data.format=chat reads the column 'messages', which no record has (columns ['input', "
                  "'instruction', 'output']); they are the alpaca format: set data.format=alpaca (or auto; for a "
                  "data.mixture entry, its format)"),
    ("alpaca", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "data.format=alpaca reads the columns 'instruction', 'output', which no record has (columns ['messages']); "
     "they are the chat format: set data.format=chat (or auto"),
    ("instances", ROW, "data.format=instances reads the column 'instances', which no record has"),
])
def test_a_format_given_by_hand_that_no_record_fits_is_one_message_not_a_bad_first_row(given, record, said):
    # data.on_bad_row's hint would skip every row; the message names the format the columns are instead.
    with pytest.raises(DataError) as refused:
        settle_format("rows.jsonl", [("line 1", record), ("line 2", record)], given, None)
    assert said in str(refused.value) and "on_bad_row" not in str(refused.value)


def test_a_format_given_by_hand_with_some_records_fitting_names_the_bad_row():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records = [("line 1", chat), ("line 2", ROW)]
    assert settle_format("rows.jsonl", records, "chat", None) == "chat"
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: field 'messages' should be a non-empty list"):
        validate_records("rows.jsonl", records, 0, "chat", None, "error")
    # columns of no format: each row's message names its keys
    other = [("line 1", {"prompt": "Say hi.", "response": "hello"})]
    assert settle_format("rows.jsonl", other, "alpaca", None) == "alpaca"
    with pytest.raises(DataError, match=r"line 1: field 'instruction' is missing \(row keys: \['prompt', 'response'\]\)"):
        validate_records("rows.jsonl", other, 0, "alpaca", None, "error")
