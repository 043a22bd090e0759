"""Reading a dataset into validated rows, before any tokenising.

Formats: Alpaca (`instruction`, `input`, `output`), nested `instances` (one row per instance), and
chat `messages` (`role`/`content`). Sources: .json/.jsonl read here, so a bad line can be named;
.csv/.parquet files, saved `datasets` folders and hub ids through `datasets`. `columns` renames a
source's columns to ours. A bad row is a DataError naming the file, the row and the problem, or,
with on_bad_row=skip, left out and counted by reason. A hub id with `streaming` is read as a stream
(`datasets.load_dataset(..., streaming=True)`): records come over the network as they are read,
never downloaded whole, and the stream is opened only when records are wanted.

Records are read as they are needed (`Located.read`), so a large dataset can be validated and
tokenised a chunk at a time (`settle_format` on the first chunk, `validate_records` on each);
`read_source` reads and validates a whole dataset at once, for the small ones.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from trainer.data.tasks import resolve_dataset

FORMATS = ("alpaca", "instances", "chat")
FIELDS = ("instruction", "input", "output", "messages", "instances")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file, the row and the problem."""


@dataclass
class Row:
    record: int  # 0-based position of the source record; a task's instances share it
    where: str  # "row 12", "row 3, instance 2": for messages
    fields: dict[str, Any]  # {"instruction", "input", "output"} or {"messages": [{"role", "content"}]}
    instance: int = 0  # which of its record's instances, 0-based (0 for the other formats)


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


class _Malformed(str):
    """A record that could not be parsed; the string says why."""


class _Line(str):
    """A .jsonl line not parsed yet: parsing waits for validation, which may run in a worker."""


# ------------------------------------------------------------------------------ finding and reading


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
    """A .jsonl file's records, one line at a time (blank lines are not records)."""
    number = 0
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of row 1.
        with open(path, encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                number += 1
                if max_rows is not None and number > max_rows:
                    return
                yield f"row {number}" + (f" (line {line_number})" if line_number != number else ""), _Line(line)
    except UnicodeDecodeError:
        # The decoder works a buffer at a time, so its position is no line: find the line again,
        # reading the file once more (only on this path: a good file is decoded as fast as ever).
        raise DataError(f"{path}: cannot read the data file: {undecodable_line(path)}; re-save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file ({error.strerror or error})") from None


def undecodable_line(path: Path) -> str:
    """Where a .jsonl file stops being UTF-8, its rows and lines numbered as `_json_lines` numbers
    them: read the same way, each undecodable byte kept as a lone surrogate (U+DC80-U+DCFF)."""
    number = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, line in enumerate(handle, start=1):
            number += bool(line.strip())
            if line.isascii():
                continue
            column = next((column for column, character in enumerate(line, start=1)
                           if "\udc80" <= character <= "\udcff"), None)
            if column is None:
                continue
            where = f"row {number}" + (f" (line {line_number})" if line_number != number else "")
            utf16 = line_number == 1 and line[:2] in ("\udcff\udcfe", "\udcfe\udcff")
            guess = "UTF-16, by its byte-order mark" if utf16 else "Latin-1 or cp1252?"
            return (f"{where}: not UTF-8 text (byte 0x{ord(line[column - 1]) - 0xdc00:02x} at character {column} "
                    f"of the line; saved as {guess})")
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
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: {json_problem(error, with_line=True)}; "
                        f"a file of one JSON object per line should be named .jsonl") from None
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


def parsed(record: Any) -> Any:
    """A record as validation reads it: a .jsonl line parsed, anything else as it is."""
    if not isinstance(record, _Line):
        return record
    try:
        # Without its line end: a line cut off inside a string is then an unterminated string, not
        # an invalid control character (the newline) at the line's end.
        return json.loads(record.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        return _Malformed(json_problem(error, with_line=False))


def json_problem(error: json.JSONDecodeError, with_line: bool) -> str:
    """"not valid JSON at column 17: Unterminated string starting", as data/prepare_common.py says it.
    Some of json's messages end in "at", waiting for the position it appends to str(error)."""
    where = f"line {error.lineno} column {error.colno}" if with_line else f"column {error.colno}"
    return f"not valid JSON at {where}: {error.msg.removesuffix(' at')}"


def load_with_datasets(name: str, split: str, streaming: bool = False, split_setting: str = "set data.split"):
    """A CSV, Parquet or Arrow file, a `save_to_disk` folder (its `split` where it holds several), or a
    hub dataset's `split`, through `datasets`; DataError naming `name` where it cannot be read (and, for
    a missing split, how to choose another: `split_setting`)."""
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
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


# ------------------------------------------------------------------------------ validating


def read_source(located: Located, format: str = "auto", columns: dict[str, str] | None = None,
                max_rows: int | None = None, on_bad_row: str = "error") -> SourceRows:
    """Every record validated, all at once (for a dataset that fits in memory: a file of
    questions, the held-out rows); bad ones raise or are counted, per on_bad_row."""
    records = [(where, parsed(record)) for where, record in located.read(max_rows)]
    format = settle_format(located.name, records, format, columns)
    rows, bad = validate_records(located.name, records, 0, format, columns, on_bad_row)
    return SourceRows(located.name, format, len(records), rows, bad)


def settle_format(name: str, records: list[tuple[str, Any]], format: str, columns: dict[str, str] | None) -> str:
    """The format (told from the records' columns under `auto`), once `columns` is checked against
    the columns the records have. A large dataset is judged by its first chunk of records."""
    if not records:  # the first chunk is empty only when the whole dataset is
        raise DataError(f"{name}: has no records (an empty file, an empty JSON list or only blank lines); "
                        f"give a file with rows")
    columns = columns or {}
    objects = [record for _, raw in records if isinstance(record := parsed(raw), dict)]
    if not objects:  # no columns to tell a format from: the records themselves are the problem
        raise DataError(_no_objects(name, records))
    present = sorted({key for record in objects for key in record})
    missing = [column for column in columns if column not in present]
    if missing or any(target not in FIELDS for target in columns.values()):
        raise DataError(f"{name}: data.columns {columns} does not fit: "
                        + (f"no column {missing}; " if missing else "")
                        + f"the file has columns {present}, and our fields are {list(FIELDS)}")
    renamed = [columns.get(column, column) for column in present]
    return _detect_format(name, renamed) if format == "auto" else format


def _no_objects(name: str, records: list[tuple[str, Any]]) -> str:
    """Why a dataset none of whose first records is an object cannot be read: its first record's problem."""
    where, raw = records[0]
    record = parsed(raw)
    if isinstance(raw, _Line) and (isinstance(record, list) or raw.lstrip().startswith("[")):
        return (f"{name}: {where}: opens with '[' (a JSON list), not an object: a file holding one JSON list "
                f"of rows should be named .json (a .jsonl file holds one JSON object a line)")
    problem = str(record) if isinstance(record, _Malformed) else f"expected an object, got {type(record).__name__}"
    hint = ("; single-quoted strings are Python's repr of a dict, not JSON (write rows with json.dumps)"
            if isinstance(raw, _Line) and raw.lstrip().startswith("{'") else "")
    return f"{name}: {where}: {problem}, and no record of the first {len(records)} is an object{hint}"


def validate_records(name: str, records: list[tuple[str, Any]], first: int, format: str,
                     columns: dict[str, str] | None, on_bad_row: str) -> tuple[list[Row], Counter]:
    """Rows of consecutive records, the first at position `first`, and the bad ones counted by
    reason (on_bad_row=skip) or raised as a DataError naming `name` and the row.

    A record whose columns `columns` renames onto one field is raised whatever on_bad_row says:
    the mapping does not fit the data (one value would be dropped unseen), which no row can fix.
    It is checked here, record by record, since the records of a .json/.jsonl file need not share
    columns and settle_format sees the first chunk alone; a csv file's or a `datasets` dataset's
    records all have every column, so there it is row 1."""
    columns = columns or {}
    rows, bad = [], Counter()
    for record_index, (where, record) in enumerate(records, start=first):
        record = parsed(record)
        if isinstance(record, dict) and columns:
            renamed = {columns.get(key, key): value for key, value in record.items()}
            if len(renamed) != len(record):
                raise DataError(_collision(name, where, record, columns))
            record = renamed
        for instance, (row_where, fields, problem) in enumerate(_validate(format, where, record)):
            if problem is None:
                rows.append(Row(record_index, row_where, fields, instance))
            elif on_bad_row == "skip":
                bad[problem[0]] += 1
            else:
                raise DataError(f"{name}: {row_where}: {problem[1]} "
                                f"(data.on_bad_row: skip leaves such rows out and counts them)")
    return rows, bad


def filled_columns(records: list[tuple[str, Any]]) -> Counter:
    """Each column of the records, with how many give it a value (not null, blank or empty)."""
    filled = Counter()
    for _, record in records:
        record = parsed(record)
        if isinstance(record, dict):
            filled.update(key for key, value in record.items()
                          if (value.strip() if isinstance(value, str) else value not in (None, [], {})))
    return filled


# The columns each format reads (named as data.columns renames them), and the source columns its
# datasets usually carry that no one means to train on: an `id`; tatsu-lab/alpaca's `text` (the row
# rendered once more); the `name` and `is_classification` of Self-Instruct's seed tasks.
READ = {"alpaca": {"instruction", "input", "output"}, "instances": {"instruction", "instances"}, "chat": {"messages"}}
USUALLY_UNREAD = {"alpaca": {"id", "text"}, "instances": {"id", "name", "is_classification"}, "chat": {"id"}}


def unread_columns(filled: dict[str, int], format: str, columns: dict[str, str] | None) -> dict[str, int]:
    """The columns of `filled_columns` that no field of `format` reads: one that data.columns leaves
    unmapped, such as a `context` beside a mapped prompt and response, is otherwise ignored unseen."""
    columns = columns or {}
    return {column: n for column, n in sorted(filled.items())
            if columns.get(column, column) not in READ[format] and column not in USUALLY_UNREAD[format]}


def _collision(name: str, where: str, record: dict, columns: dict[str, str]) -> str:
    """The message for a record two of whose columns `columns` renames onto one field."""
    by_field: dict[str, list[str]] = {}
    for key in record:
        by_field.setdefault(columns.get(key, key), []).append(key)
    field_name, keys = next((field_name, keys) for field_name, keys in by_field.items() if len(keys) > 1)
    mapped = [key for key in keys if key in columns]
    if len(mapped) > 1:
        return (f"{name}: {where}: data.columns maps {' and '.join(map(repr, mapped))} to the same field "
                f"{field_name!r}, and the row has both: one would be dropped unseen. Map them to different "
                f"fields, or remove or rename one of them in the file")
    return (f"{name}: {where}: data.columns maps {mapped[0]!r} to {field_name!r}, but the row also has a column "
            f"{field_name!r}: one of the two would be dropped unseen. Remove or rename one of them in the file, "
            f"or map {field_name!r} to another field in data.columns too")


def _detect_format(name: str, columns: list[str]) -> str:
    if "messages" in columns:
        return "chat"
    if "instances" in columns:
        return "instances"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    raise DataError(f"{name}: cannot tell the format from its columns {columns}: expected instruction/input/"
                    f"output, instruction/instances or messages. Map yours with data.columns, "
                    f"e.g. data.columns={{prompt: instruction, response: output}}")


Problem = tuple[str, str]  # (reason counted in the stats, message)


def _validate(format: str, where: str, record: Any) -> list[tuple[str, dict, Problem | None]]:
    if isinstance(record, _Malformed):
        return [(where, {}, ("invalid JSON", str(record)))]
    if not isinstance(record, dict):
        return [(where, {}, ("not an object", f"expected an object, got {type(record).__name__}"))]
    if format == "chat":
        messages, problem = _chat(record)
        return [(where, {"messages": messages}, problem)]
    problem = _text(record, "instruction", required=True)
    if format == "alpaca":
        problem = problem or _text(record, "input", required=False) or _text(record, "output", required=True)
        return [(where, _alpaca(record) if problem is None else {}, problem)]
    instances = record.get("instances")
    if problem is None and (not isinstance(instances, list) or not instances):
        problem = ("bad instances", f"field 'instances' should be a non-empty list, got {instances!r:.60}")
    if problem is not None:
        return [(where, {}, problem)]
    rows = []
    for number, instance in enumerate(instances, start=1):
        row = {**instance, "instruction": record["instruction"]} if isinstance(instance, dict) else None
        problem = (("bad instances", f"instance is {type(instance).__name__}, not an object") if row is None
                   else _text(row, "input", required=False) or _text(row, "output", required=True))
        rows.append((f"{where}, instance {number}", _alpaca(row) if problem is None else {}, problem))
    return rows


def _text(record: dict, key: str, required: bool) -> Problem | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if value is None and key in record:  # null: an empty cell, or a table row without it (`datasets` fills columns)
        return (f"empty {key}",
                f"field {key!r} is empty (a null, an empty cell, or not given in this row of a table)")
    if value is None:
        return (f"missing {key}", f"field {key!r} is missing (row keys: {sorted(record)})")
    if not isinstance(value, str):
        return (f"{key} not a string", f"field {key!r} is {type(value).__name__}, not a string: {value!r:.60}")
    if required and not value.strip():
        return (f"empty {key}", f"field {key!r} is empty")
    if not value.isascii() and (surrogate := _unpaired_surrogate(value)) is not None:
        return ("unpaired surrogate", f"field {key!r} {surrogate}")
    return None


def _unpaired_surrogate(value: str) -> str | None:
    """What is wrong with `value` if it holds half of a UTF-16 pair: JSON's "\\ud83d" parses to one,
    which no tokenizer (nor UTF-8) takes. (Callers ask only of non-ASCII text: most is ASCII.)"""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds an unpaired surrogate {value[error.start]!r} at character {error.start + 1} (half of "
                f"a UTF-16 pair, such as an emoji cut in two): remove it or complete the pair in the file")
    return None


def _alpaca(record: dict) -> dict[str, str]:
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def _chat(record: dict) -> tuple[list[dict[str, str]], Problem | None]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [], ("bad messages", f"field 'messages' should be a non-empty list, got {messages!r:.60}")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return [], ("bad messages", f"message {number} should be an object with role in {list(ROLES)}, "
                                        f"got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            return [], ("bad messages", f"message {number}: 'content' is not a string: {message.get('content')!r:.60}")
        if message["role"] == "assistant" and not message["content"].strip():
            return [], ("empty output", f"message {number}: the assistant's content is empty")
        if not message["content"].isascii() and (surrogate := _unpaired_surrogate(message["content"])) is not None:
            return [], ("unpaired surrogate", f"message {number}: 'content' {surrogate}")
    # Turns after the last assistant message have nothing to train on.
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return [], ("bad messages", "no assistant message: nothing to train on")
    if messages[0]["role"] == "assistant":
        return [], ("bad messages", "the conversation opens with the assistant: no prompt to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last + 1]], None
