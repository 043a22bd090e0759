"""Records -> validated rows, before any tokenising: the format told from the columns, and a bad row named
or skipped.

Formats: Alpaca (`instruction`, `input`, `output`), nested `instances` (one row per instance), and
chat `messages` (`role`/`content`), or ShareGPT's `conversations` (`from`: human/gpt/system,
`value`), read as messages. `columns` renames a source's columns to ours. A bad row is a
DataError naming the file, the row and the problem, or, with on_bad_row=skip, left out and counted
by reason. A large dataset is validated a chunk at a time (`settle_format` on the first chunk,
`validate_records` on each).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

FORMATS = ("alpaca", "instances", "chat")
FIELDS = ("instruction", "input", "output", "messages", "instances")
ROLES = ("system", "user", "assistant")
# ShareGPT (axolotl's and LLaMA-Factory's sharegpt): a `conversations` column of {from, value} turns
SHAREGPT_COLUMN = "conversations"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file, the row and the problem."""


@dataclass
class Row:
    record: int  # 0-based position of the source record; a task's instances share it
    where: str  # "row 12", "row 3, instance 2": for messages
    fields: dict[str, Any]  # {"instruction", "input", "output"} or {"messages": [{"role", "content"}]}
    instance: int = 0  # which of its record's instances, 0-based (0 for the other formats)


class _Malformed(str):
    """A record that could not be parsed; the string says why."""


class _NotUtf8(_Malformed):
    """A .jsonl line holding bytes that are not UTF-8; the string says which and where."""


class _Line(str):
    """A .jsonl line not parsed yet: parsing waits for validation, which may run in a worker. Read with
    errors="surrogateescape": a byte that is not UTF-8 is a lone surrogate (U+DC80-U+DCFF) here, and
    makes the line a bad row of its own, not the whole file unreadable."""


def parsed(record: Any) -> Any:
    """A record as validation reads it: a .jsonl line parsed, anything else as it is."""
    if not isinstance(record, _Line):
        return record
    if not record.isascii() and (problem := not_utf8(record)) is not None:
        return _NotUtf8(f"{problem}; re-save it as UTF-8")
    try:
        # Without its line end: a line cut off inside a string is then an unterminated string, not
        # an invalid control character (the newline) at the line's end.
        return json.loads(record.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        return _Malformed(json_problem(error, with_line=False))


def not_utf8(line: str) -> str | None:
    """Where `line`, read with errors="surrogateescape", holds a byte that is not UTF-8, and what the
    file may have been saved as; None where it holds none."""
    column = next((column for column, character in enumerate(line, start=1) if "\udc80" <= character <= "\udcff"),
                  None)
    if column is None:
        return None
    guess = "UTF-16, by its byte-order mark" if line[:2] in ("\udcff\udcfe", "\udcfe\udcff") else "Latin-1 or cp1252?"
    return (f"not UTF-8 text (byte 0x{ord(line[column - 1]) - 0xdc00:02x} at character {column} of the line; "
            f"saved as {guess})")


def json_problem(error: json.JSONDecodeError, with_line: bool) -> str:
    """"not valid JSON at column 17: Unterminated string starting", as data/prepare_common.py says it.
    Some of json's messages end in "at", waiting for the position it appends to str(error)."""
    where = f"line {error.lineno} column {error.colno}" if with_line else f"column {error.colno}"
    return f"not valid JSON at {where}: {error.msg.removesuffix(' at')}"


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
    columns = _with_sharegpt(columns, present)
    renamed = [columns.get(column, column) for column in present]
    if format == "auto":
        return _detect_format(name, renamed)
    _check_format_fits(name, format, renamed)
    return format


# The columns without which no record of a format can be a row.
NEEDED = {"alpaca": ("instruction", "output"), "instances": ("instruction", "instances"), "chat": ("messages",)}


def _check_format_fits(name: str, format: str, columns: list[str]) -> None:
    """A data.format given by hand that the records' columns do not have, where they are another format:
    every row would be bad, and data.on_bad_row=skip would leave none. Said once, naming the format the
    columns are. (Columns of no format are left to each row's message, which names the row's keys.)"""
    absent = [column for column in NEEDED[format] if column not in columns]
    try:
        detected = _detect_format(name, columns)
    except DataError:
        return
    if absent and detected != format:
        raise DataError(f"{name}: data.format={format} reads the column{'s' if len(absent) > 1 else ''} "
                        f"{', '.join(repr(column) for column in absent)}, which no record has (columns {columns}); "
                        f"they are the {detected} format: set data.format={detected} (or auto; for a "
                        f"data.mixture entry, its format)")


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
        if isinstance(record, dict) and (mapping := _with_sharegpt(columns, record)):
            renamed = {mapping.get(key, key): value for key, value in record.items()}
            if len(renamed) != len(record):
                raise DataError(_collision(name, where, record, mapping))
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


def _with_sharegpt(columns: dict[str, str], keys) -> dict[str, str]:
    """`columns`, plus ShareGPT's `conversations` read as `messages` where a record (`keys`) has it and
    neither a `messages` column nor a mapping of its own for it."""
    if (SHAREGPT_COLUMN in keys and "messages" not in keys and SHAREGPT_COLUMN not in columns
            and "messages" not in columns.values()):
        return {**columns, SHAREGPT_COLUMN: "messages"}
    return columns


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
    columns = _with_sharegpt(columns or {}, filled) if format == "chat" else columns or {}
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
                    f"output, instruction/instances, messages or ShareGPT's conversations. Map yours with data.columns, "
                    f"e.g. data.columns={{prompt: instruction, response: output}}")


Problem = tuple[str, str]  # (reason counted in the stats, message)


def _validate(format: str, where: str, record: Any) -> list[tuple[str, dict, Problem | None]]:
    if isinstance(record, _Malformed):
        return [(where, {}, ("not UTF-8" if isinstance(record, _NotUtf8) else "invalid JSON", str(record)))]
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


def _sharegpt_turn(message: Any) -> Any:
    """A ShareGPT turn ({from, value}, no role) as a message ({role, content}); anything else as it is
    (an unknown `from` too, which `_chat` names)."""
    speaker = message.get("from") if isinstance(message, dict) and "role" not in message else None
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        return message
    return {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}


def _chat(record: dict) -> tuple[list[dict[str, str]], Problem | None]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [], ("bad messages", f"field 'messages' should be a non-empty list, got {messages!r:.60}")
    messages = [_sharegpt_turn(message) for message in messages]
    for number, message in enumerate(messages, start=1):
        if isinstance(message, dict) and "from" in message and "role" not in message:
            return [], ("bad messages", f"message {number}: 'from' is {message['from']!r:.40}; ShareGPT turns are "
                                        f"from {', '.join(SHAREGPT_ROLES)}")
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
