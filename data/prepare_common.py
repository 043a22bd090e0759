"""What every `data/<name>/prepare.py` shares: its command line, reading a local file or a hub
dataset, naming bad rows by file and row, and writing Alpaca rows as JSON lines.

A prepare script brings one function, record -> {instruction, input, output}, that raises RowError
for a record it cannot convert; reading, reporting and writing are here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real data and tokenizers kept beside the checkout, never copied into it
SHARED_DATA = SHARED / "data"
# Read here so a bad line can be named by its number; .csv/.parquet go through `datasets`.
JSON_SUFFIXES = (".json", ".jsonl")
LOCAL_SUFFIXES = (*JSON_SUFFIXES, ".csv", ".parquet")
SHOWN_BAD_ROWS = 10

Convert = Callable[[dict[str, Any]], dict[str, str]]


class RowError(ValueError):
    """A record that cannot become an Alpaca row; the message says why, the caller adds file and row."""


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing file, invalid JSON list, hub unreachable)."""


# ------------------------------------------------------------------------------ converting one record


def text(record: dict[str, Any], key: str, required: bool = True) -> str:
    """record[key] as a string: a missing optional field is "", a required one must not be blank."""
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None and key in record:  # null: an empty cell, or a table row without it (`datasets` fills columns)
        raise RowError(f"field {key!r} is empty (a null, an empty cell, or not given in this row of a table)")
    if value is None:
        raise RowError(f"field {key!r} is missing (row keys: {sorted(record)})")
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is {type(value).__name__}, not a string: {value!r:.60}")
    if required and not value.strip():
        raise RowError(f"field {key!r} is empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:  # JSON's "\ud83d" parses to half a UTF-16 pair, which UTF-8 cannot hold
            raise RowError(f"field {key!r} holds an unpaired surrogate {value[error.start]!r} at character "
                           f"{error.start + 1} (half of a UTF-16 pair, such as an emoji cut in two): remove it or "
                           f"complete the pair in the file") from None
    return value


def alpaca(record: dict[str, Any], instruction: str = "instruction", input: str = "input",
           output: str = "output") -> dict[str, str]:
    """An Alpaca row from the record's fields of these names; other fields are left behind."""
    return {"instruction": text(record, instruction), "input": text(record, input, required=False),
            "output": text(record, output)}


# ------------------------------------------------------------------------------ reading a source


def is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).exists()


def read_records(source: str, split: str = "train", max_rows: int | None = None,
                 hub_config: str | None = None) -> tuple[str, Iterator[tuple[str, Any]]]:
    """The source's name as messages give it, and its first max_rows records as (where, record).

    A JSON line that does not parse comes back as a RowError in place of its record, so it is
    reported with the other bad rows instead of ending the run."""
    path = Path(source)
    if is_local(source) and not path.exists():
        raise SourceError(f"{source}: no such file")
    suffix = path.suffix.lower()  # rows.JSONL is a file, not a hub id
    if suffix in JSON_SUFFIXES:
        return str(path), (_jsonl(path, max_rows) if suffix == ".jsonl" else _json_list(path, max_rows))
    dataset = _load_with_datasets(source, split, hub_config)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    # save_to_disk's Dataset (its state.json at the top; a DatasetDict's are in its splits' folders) is one
    # split, read whole: no split to name
    whole = path.is_file() or (path / "state.json").is_file()
    name = source if whole else f"{source} (split {split})"
    return name, ((f"row {number}", record) for number, record in enumerate(dataset, start=1))


def _jsonl(path: Path, max_rows: int | None) -> Iterator[tuple[str, Any]]:
    number = 0
    with open(path, encoding="utf-8-sig") as file:  # a byte-order mark is not part of row 1
        try:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                if number == max_rows:
                    return
                number += 1
                where = f"row {number}" + (f" (line {line_number})" if line_number != number else "")
                try:
                    yield where, json.loads(line.rstrip("\r\n"))  # a cut-off string must not end in the newline
                except json.JSONDecodeError as error:
                    yield where, RowError(f"not valid JSON at column {error.colno}: {error.msg.removesuffix(' at')}")
        except UnicodeDecodeError:
            # Decoded a buffer at a time, so the rows read so far do not say where: the trainer's reader
            # finds the line again (imported here: it is needed only on this path).
            from trainer.data.sources import undecodable_line

            raise SourceError(f"{path}: {undecodable_line(path)}; re-save the file as UTF-8") from None


def _json_list(path: Path, max_rows: int | None) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: not a JSON file ({error}); one JSON object per line should be named .jsonl") \
            from None
    if not isinstance(rows, list):
        raise SourceError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    return ((f"row {number}", row) for number, row in enumerate(rows[:max_rows], start=1))


def _load_with_datasets(source: str, split: str, hub_config: str | None):
    # Imported here: reading a JSON file should not pay for importing `datasets` (about a second).
    import datasets

    from trainer.data.formats import DataError
    from trainer.data.sources import load_with_datasets

    path = Path(source)
    if path.exists():  # a CSV/Parquet file or a folder (save_to_disk's, or data files): as the trainer reads it
        try:
            return load_with_datasets(source, split, split_setting="pass --split")
        except DataError as error:
            raise SourceError(str(error)) from None
    try:
        return datasets.load_dataset(source, hub_config, split=split)
    except Exception as error:  # datasets raises many types for "not found / offline / bad file"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SourceError(f"{source}: could not load split {split!r} from the hub (offline? pass --source with a "
                          f"local file): {first_line}") from None


# ------------------------------------------------------------------------------ the command


def arguments(description: str, default_source: str, default_out: Path, hub_config: str | None,
              argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=default_source,
                        help=f"a local .json/.jsonl/.csv/.parquet file, a save_to_disk folder or a hub dataset id "
                             f"(default: {default_source})")
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON lines to write (default: {default_out})")
    parser.add_argument("--max-rows", type=int, default=None, help="read only the source's first N records")
    parser.add_argument("--split", default=None,
                        help="split of a hub dataset or a save_to_disk folder (default: train); a file has none")
    parser.add_argument("--config", default=hub_config, help=f"configuration of a hub dataset (default: {hub_config})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write the good rows and report the bad ones, instead of writing nothing")
    args = parser.parse_args(argv)
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max-rows must be at least 1")
    if args.split is not None and Path(args.source).is_file():
        parser.error(f"--split {args.split}: {args.source} is one file, read whole (it has no splits); --split names "
                     f"a split of a hub dataset or of a save_to_disk folder")
    args.split = args.split or "train"
    return args


def main(description: str, convert: Convert, default_source: str, default_out: Path,
         hub_config: str | None = None, argv: list[str] | None = None) -> int:
    """Read --source, convert every record, write --out; the exit status is 0 only when rows were written."""
    args = arguments(description, default_source, default_out, hub_config, argv)
    try:
        name, records = read_records(args.source, args.split, args.max_rows, args.config)
        written, bad = write_rows(records, convert, name, args.out, keep_going=args.skip_bad)
    except SourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in bad[:SHOWN_BAD_ROWS]:
        print(message, file=sys.stderr)
    if len(bad) > SHOWN_BAD_ROWS:
        print(f"... and {len(bad) - SHOWN_BAD_ROWS} more bad rows", file=sys.stderr)
    if bad and not args.skip_bad:
        print(f"error: {len(bad)} bad rows in {name}; nothing written (--skip-bad writes the others)", file=sys.stderr)
        return 1
    if written == 0:
        print(f"error: no rows to write from {name}", file=sys.stderr)
        return 1
    print(f"wrote {written} rows to {args.out} from {name}" + (f"; skipped {len(bad)} bad rows" if bad else ""))
    return 0


def write_rows(records: Iterator[tuple[str, Any]], convert: Convert, name: str, out: Path,
               keep_going: bool) -> tuple[int, list[str]]:
    """Converted rows streamed to `out`, one JSON object a line; returns (rows written, bad-row messages).

    Written beside `out` and renamed into place, so `out` is never half written; with bad rows and
    not keep_going nothing is written, and every bad row is still reported."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing")
    written, bad = 0, []
    try:
        with open(staging, "w", encoding="utf-8") as file:
            for where, record in records:
                try:
                    if isinstance(record, RowError):
                        raise record
                    if not isinstance(record, dict):
                        raise RowError(f"expected an object, got {type(record).__name__}")
                    row = convert(record)
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")  # written whole or, unencodable, not at all
                except RowError as error:
                    bad.append(f"{name}: {where}: {error}")
                    continue
                except UnicodeEncodeError as error:  # a field `convert` took without `text` holds half a pair
                    bad.append(f"{name}: {where}: holds an unpaired surrogate {error.object[error.start]!r} "
                               f"(half of a UTF-16 pair, such as an emoji cut in two): remove it or complete the pair")
                    continue
                written += 1
        if written and (keep_going or not bad):
            os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return written, bad
