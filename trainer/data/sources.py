"""Finding a dataset and reading its records as they are needed (`Located.read`), so that a large one
can be validated and tokenised a chunk at a time.

Sources: .json/.jsonl read here, so a bad line can be named; .csv/.parquet files, saved `datasets`
folders and hub ids through `datasets`. A hub id with `streaming` is read as a stream
(`datasets.load_dataset(..., streaming=True)`): records come over the network as they are read,
never downloaded whole, and the stream is opened only when records are wanted. `read_source` reads
and validates a whole dataset at once, for the small ones.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from trainer.data.formats import DataError, Row, _Line, json_problem, not_utf8, parsed, settle_format, validate_records
from trainer.data.tasks import resolve_dataset


@dataclass
class SourceRows:
    name: str  # the file or dataset, as messages and stats name it
    format: str
    records: int  # records read, bad ones included
    rows: list[Row] = field(default_factory=list)
    bad: Counter = field(default_factory=Counter)  # reason -> rows skipped


@dataclass
class Located:
    """A dataset found but not yet read: `identity` changes whenever its content may have."""
    name: str
    identity: str
    # max_rows -> (where, record) in file order, read as they are needed (a .jsonl file line by
    # line, its lines parsed when validated); a record that cannot be parsed is a _Malformed.
    read: Callable[[int | None], Iterator[tuple[str, Any]]]
    # max_rows -> about how many records `read` gives, for a progress bar (a .jsonl file: its lines
    # counted; a stream: None, not known until it ends).
    count: Callable[[int | None], int | None]
    # record positions -> those records as `read` gives them, in the order asked.
    pick: Callable[[list[int]], list[tuple[str, Any]]]
    streamed: bool = False  # a hub dataset read as a stream: `pick` reads it again up to the last position


def locate(path: str, split: str = "train", streaming: bool = False) -> Located:
    """`path` found, not read. `streaming` applies to hub ids; local files are read as they always
    are (.json/.jsonl here, a chunk at a time; csv/parquet/saved datasets memory-mapped by `datasets`,
    nothing downloaded)."""
    resolved = resolve_dataset(path)
    local = Path(resolved)
    suffix = local.suffix.lower()  # rows.JSONL is a file, not a hub id
    if suffix in (".json", ".jsonl"):
        try:
            stat = local.stat()
        except OSError as error:
            raise DataError(f"{local}: cannot read the data file ({error.strerror})") from None
        read = (lambda max_rows: _json_lines(local, max_rows)) if suffix == ".jsonl" else \
            (lambda max_rows: iter(_json_array(local)[:max_rows]))
        count = (lambda max_rows: _count_lines(local, max_rows)) if suffix == ".jsonl" else \
            (lambda max_rows: sum(1 for _ in read(max_rows)))
        return Located(str(local), f"{local.resolve()}:{stat.st_size}:{stat.st_mtime_ns}", read, count,
                       lambda positions: _picked(read(None), positions))
    if streaming and not local.exists():
        return _streamed(resolved, split)
    dataset = load_with_datasets(resolved, split)
    name = resolved if local.exists() else f"{resolved} (split {split})"

    def read(max_rows: int | None) -> Iterator[tuple[str, Any]]:
        chosen = dataset if max_rows is None else dataset.select(range(min(max_rows, len(dataset))))
        number = 0
        for batch in chosen.iter(batch_size=1024):
            for values in zip(*batch.values()):
                number += 1
                yield f"row {number}", dict(zip(batch, values))

    def pick(positions: list[int]) -> list[tuple[str, Any]]:
        return [(f"row {position + 1}", record)
                for position, record in zip(positions, dataset.select(positions))] if positions else []

    # A dataset's fingerprint changes with its files (local) or revision (hub).
    return Located(name, f"datasets:{resolved}:{split}:{dataset._fingerprint}", read,
                   lambda max_rows: len(dataset) if max_rows is None else min(max_rows, len(dataset)), pick)


def _streamed(name: str, split: str) -> Located:
    """A hub dataset as a stream, not opened until read. Its identity (the cache key's source part)
    is what `load_dataset` is given, the id and split: a stream has no fingerprint before it is read
    through, so a dataset changed on the hub under the same id is not noticed (data.cache: false
    reads it again)."""
    label = f"{name} (split {split})"

    def read(max_rows: int | None) -> Iterator[tuple[str, Any]]:
        stream = iter(load_with_datasets(name, split, streaming=True))
        # islice stops without asking for record max_rows + 1 (IterableDataset.take would).
        records = stream if max_rows is None else islice(stream, max_rows)
        number = 0
        try:
            for record in records:
                number += 1
                yield f"row {number}", record
        except Exception as error:  # the network or a shard failing mid-stream: datasets raises many types
            raise DataError(f"{label}: the stream failed after row {number}: {_first_line(error)}") from error

    return Located(label, f"datasets stream:{json.dumps({'path': name, 'split': split})}", read,
                   lambda max_rows: None, lambda positions: _picked(read(None), positions), streamed=True)


def _json_lines(path: Path, max_rows: int | None) -> Iterator[tuple[str, Any]]:
    """A .jsonl file's records, one line at a time (blank lines are not records). A line that is not
    UTF-8 is a bad row (formats.parsed), as one that is not JSON."""
    number = 0
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of row 1.
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                number += 1
                if max_rows is not None and number > max_rows:
                    return
                yield f"row {number}" + (f" (line {line_number})" if line_number != number else ""), _Line(line)
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file ({error.strerror or error})") from None


def undecodable_line(path: Path) -> str:
    """Where a .jsonl file stops being UTF-8, its rows and lines numbered as `_json_lines` numbers
    them: read the same way, each undecodable byte kept as a lone surrogate (U+DC80-U+DCFF)."""
    number = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, line in enumerate(handle, start=1):
            number += bool(line.strip())
            if not line.isascii() and (problem := not_utf8(line)) is not None:
                return f"row {number}" + (f" (line {line_number})" if line_number != number else "") + f": {problem}"
    return "not UTF-8 text"


def _count_lines(path: Path, max_rows: int | None) -> int:
    """The records of a .jsonl file, counted without decoding or parsing (for a progress bar: a
    line of Unicode whitespace alone counts here, not in `_json_lines`)."""
    count = 0
    with open(path, "rb") as handle:
        for line in handle:
            count += bool(line.strip())
            if max_rows is not None and count >= max_rows:
                break
    return count


def _json_array(path: Path) -> list[tuple[str, Any]]:
    """A .json file's rows: the list is parsed whole (JSON has no way to read part of one)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not JSON
    except UnicodeDecodeError as error:  # decoded whole, so its position is the file's (after any mark)
        line = error.object.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: cannot read the data file: line {line}: not UTF-8 text (byte "
                        f"0x{error.object[error.start]:02x}: {error.reason}); re-save it as UTF-8") from None
    if not text.strip():
        return []  # said as a file with no records, as an empty .jsonl is
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        # "Extra data": a second value after the first, as in a file of one JSON object per line
        hint = "; a file of one JSON object per line should be named .jsonl" if error.msg == "Extra data" else ""
        raise DataError(f"{path}: {json_problem(error, with_line=True)}{hint}") from None
    if not isinstance(rows, list):
        keys = f" with keys {sorted(rows)[:10]}" if isinstance(rows, dict) else ""
        raise DataError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}{keys}")
    return [(f"row {number}", row) for number, row in enumerate(rows, start=1)]


def _picked(records: Iterator[tuple[str, Any]], positions: list[int]) -> list[tuple[str, Any]]:
    wanted = set(positions)
    found = {}
    for position, record in enumerate(records):
        if position in wanted:
            found[position] = record
            if len(found) == len(wanted):
                break
    return [found[position] for position in positions if position in found]


def load_with_datasets(name: str, split: str, streaming: bool = False, split_setting: str = "set data.split"):
    """A CSV, Parquet or Arrow file, a `save_to_disk` folder (its `split` where it holds several), or a
    hub dataset's `split`, through `datasets`; DataError naming `name` where it cannot be read (and, for
    a missing split, how to choose another: `split_setting`)."""
    import datasets

    local = Path(name)
    saved = local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists())
    try:
        if saved:
            dataset = datasets.load_from_disk(str(local))
        elif local.suffix.lower() == ".csv":
            # Every column as text: inferred types make an answer "5" the int 5, and "3" in a column
            # with a blank cell the float 3.0. A blank cell alone is missing (None); an answer
            # "NA" or "null" stays text.
            features = text_columns(local)
            dataset = datasets.load_dataset("csv", data_files=str(local), split="train", features=features,
                                            keep_default_na=False, na_values=[""])
        elif local.suffix.lower() in (".parquet", ".arrow"):
            builder = local.suffix.lower().lstrip(".")
            dataset = datasets.load_dataset(builder, data_files=str(local), split="train")
        else:
            dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types for "not found / offline / bad file"
        raise DataError(f"{name}: could not load as a file, a saved dataset or a hub dataset "
                        f"(split {split}{', streaming' if streaming else ''}): {_first_line(error)}") from None
    if local.is_dir() and not saved and getattr(getattr(dataset, "info", None), "builder_name", None) == "text":
        # A folder of mostly .txt files: `datasets` reads each line as a row of one 'text' column.
        raise DataError(f"{name}: a folder whose files `datasets` reads as plain text (one column 'text', a row "
                        f"per line), not instruction rows: give a data file (.json, .jsonl, .csv, .parquet), a "
                        f"folder of such files, or a folder written by save_to_disk")
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{name}: no split {split!r}; it has {sorted(dataset)} ({split_setting})")
        dataset = dataset[split]
    elif split != "train" and local.is_dir() and isinstance(dataset, datasets.Dataset) and (local / "state.json").exists():
        raise DataError(f"{name}: a saved dataset of one split, read whole: it has no split {split!r} "
                        f"(a split is named in a saved DatasetDict or a hub dataset)")
    return dataset


def text_columns(path: Path):
    """Features naming each of a CSV file's columns a string, the names read as pandas (which
    `datasets` reads the file with) reads the header."""
    import datasets
    import pandas

    try:
        first = pandas.read_csv(path, nrows=1, dtype=str)
    except pandas.errors.EmptyDataError:  # not even a header
        first = None
    if first is None or first.empty:
        raise DataError(f"{path}: has no records (an empty file, or a header with no rows); give a file with rows")
    return datasets.Features({column: datasets.Value("string") for column in first.columns})


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def read_source(located: Located, format: str = "auto", columns: dict[str, str] | None = None,
                max_rows: int | None = None, on_bad_row: str = "error") -> SourceRows:
    """Every record validated, all at once (for a dataset that fits in memory: a file of
    questions, the held-out rows); bad ones raise or are counted, per on_bad_row."""
    records = [(where, parsed(record)) for where, record in located.read(max_rows)]
    format = settle_format(located.name, records, format, columns)
    rows, bad = validate_records(located.name, records, 0, format, columns, on_bad_row)
    return SourceRows(located.name, format, len(records), rows, bad)
