"""Tokenised examples on disk, read through memory maps.

A store is one dataset's examples in a directory of .npy files: every example's token ids and
labels end to end (int32), where each example starts (`offsets`, int64, one more than the
examples), and per example its row id, question hash (`leakage.question_id`) and number of trained
tokens. It is written once, chunk by chunk, into a temporary directory renamed into place when
complete, so a reader sees a whole store or none. Readers map the files: the pages are the page
cache's, shared by every rank of a node and never part of a process's private memory.

The train and held-out sets are `Examples`: positions into one or more stores (a mixture) as one
int64 array, which turn into `Example` objects one at a time, when a batch needs them.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.examples import IGNORE_INDEX, EncodedRows, Example
from trainer.data.formats import DataError

TOKEN_ARRAYS = {"input_ids": np.int32, "labels": np.int32}
EXAMPLE_ARRAYS = {"offsets": np.int64, "row_ids": np.int64, "questions": np.int64, "trained": np.int32,
                  "instances": np.int32}
INFO = "info.json"  # written last: a directory without it is not a store
HEADER_BYTES = 128  # a 1-D .npy header (format 1.0) pads to 128 bytes for any length below 10**20
# Passing failures of this process or machine (open files, memory), not of the store's files: a
# DataError that keeps the store, so that one that is fine is never discarded and tokenised again. (A
# store this user may not read is not one: the cache then tokenises into a scratch store, as before.)
NOT_THE_STORE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR)


class UnreadableStore(ValueError):
    """A store directory whose files cannot be mapped as a store; the message names the directory."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot read this tokenised store ({reason}); delete the directory, "
                         f"and the data is tokenised again on the next run")
        self.reason = reason


class Store:
    """One dataset's examples, memory-mapped. `info` is what the pipeline said about the dataset
    when it wrote the store: name, format, records, outcomes, and the source it read (path, split,
    columns), as a record: held-out rows are read back from the run's own data config, which may
    name the same file by another path."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.info: dict[str, Any] = json.loads((self.path / INFO).read_text())
            # Plain arrays over the maps: np.memmap's own indexing costs microseconds an example.
            arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r").view(np.ndarray)
                      for name in (*TOKEN_ARRAYS, *EXAMPLE_ARRAYS)}
        except (OSError, ValueError) as error:  # a file missing, cut short (a full disk, a copy) or not ours
            if isinstance(error, OSError) and error.errno in NOT_THE_STORE:
                raise DataError(f"{self.path}: cannot open this tokenised store now ({error.strerror}); it is kept. "
                                f"Run again once the machine has room (too many open files: raise `ulimit -n`)") from error
            raise UnreadableStore(self.path, str(error)) from None
        self.input_ids, self.labels = arrays["input_ids"], arrays["labels"]
        self.offsets, self.row_ids = arrays["offsets"], arrays["row_ids"]
        self.questions, self.trained, self.instances = arrays["questions"], arrays["trained"], arrays["instances"]
        if len(self.offsets) != len(self.row_ids) + 1 or self.offsets[-1] != len(self.input_ids):
            raise UnreadableStore(self.path, "the offsets do not match the token arrays")

    def __len__(self) -> int:
        return len(self.row_ids)

    def example(self, index: int, row_offset: int = 0) -> Example:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return Example(int(self.row_ids[index]) + row_offset, self.input_ids[start:end], self.labels[start:end],
                       int(self.questions[index]))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def chunks(self, examples: int = 16384) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first example, ids, labels, starts within the chunk) for consecutive runs of examples,
        read from the maps a chunk at a time, so a check over all of them holds one chunk."""
        for first in range(0, len(self), examples):
            offsets = np.asarray(self.offsets[first:first + examples + 1])
            ids = np.asarray(self.input_ids[offsets[0]:offsets[-1]], dtype=np.int64)
            labels = np.asarray(self.labels[offsets[0]:offsets[-1]], dtype=np.int64)
            yield first, ids, labels, offsets[:-1] - offsets[0]


class StoreWriter:
    """Writes a store chunk by chunk into a temporary sibling of `path`; `finish` renames it into
    place. If another process finished the same store first, theirs is kept (it holds the same
    examples: the path is the cache key); a store there that cannot be read is replaced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.temporary, ignore_errors=True)  # left by a process that died while writing
        self.temporary.mkdir(parents=True)
        self.files = {name: open(self.temporary / f"{name}.npy", "wb") for name in (*TOKEN_ARRAYS, *EXAMPLE_ARRAYS)}
        self.lengths = dict.fromkeys(self.files, 0)
        for handle in self.files.values():
            handle.write(b"\0" * HEADER_BYTES)  # the real header, once the length is known
        self._write("offsets", np.zeros(1, np.int64))

    def append(self, encoded: EncodedRows) -> None:
        if not len(encoded.lengths):
            return
        starts = np.concatenate([[0], np.cumsum(encoded.lengths)[:-1]])
        trained = np.add.reduceat(trained_mask(encoded.labels, starts), starts)
        self._write("offsets", self.lengths["input_ids"] + np.cumsum(encoded.lengths))  # where each one ends
        self._write("input_ids", encoded.input_ids)
        self._write("labels", encoded.labels)
        self._write("row_ids", encoded.row_ids)
        self._write("questions", encoded.questions)
        self._write("instances", encoded.instances)
        self._write("trained", trained)

    def _write(self, name: str, values: np.ndarray) -> None:
        dtype = {**TOKEN_ARRAYS, **EXAMPLE_ARRAYS}[name]
        self.files[name].write(np.ascontiguousarray(values, dtype=dtype).tobytes())
        self.lengths[name] += len(values)

    def finish(self, info: dict[str, Any]) -> Path:
        for name, handle in self.files.items():
            handle.seek(0)
            handle.write(_npy_header({**TOKEN_ARRAYS, **EXAMPLE_ARRAYS}[name], self.lengths[name]))
            handle.close()
        (self.temporary / INFO).write_text(json.dumps(info))
        try:
            os.rename(self.temporary, self.path)
        except OSError:
            if not (self.path / INFO).is_file():
                raise
            if _readable(self.path):  # another process finished first: theirs holds the same examples
                shutil.rmtree(self.temporary, ignore_errors=True)
                return self.path
            self._replace_unreadable()
        return self.path

    def _replace_unreadable(self) -> None:
        # What is at the path cannot be read (a copy cut short, a full disk): ours takes its place.
        try:
            discard(self.path)
            os.rename(self.temporary, self.path)
        except OSError as error:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise OSError(f"{self.path}: a tokenised store there cannot be read and could not be replaced "
                          f"({error.strerror or error}); delete that directory") from None

    def abort(self) -> None:
        for handle in self.files.values():
            handle.close()
        shutil.rmtree(self.temporary, ignore_errors=True)


def _readable(path: Path) -> bool:
    try:
        Store(path)
        return True
    except UnreadableStore:
        return False


def discard(path: Path) -> None:
    """Delete a store that cannot be read. It is renamed out of the way first, which is atomic: the
    path is free at once, and no reader meets a directory half deleted."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.unreadable")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def trained_mask(labels: np.ndarray, starts: np.ndarray) -> np.ndarray:
    # An example's first label is never a target: the loss predicts token t from tokens before it.
    trained = labels != IGNORE_INDEX
    trained[starts] = False
    return trained


def _npy_header(dtype, length: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": (length,)})
    header = buffer.getvalue()
    assert len(header) == HEADER_BYTES, len(header)
    return header


# ------------------------------------------------------------------------------ views


@dataclass(frozen=True)
class Part:
    store: Store
    row_offset: int  # added to the store's row ids: rows of a mixture are numbered one dataset after another


class Examples(Sequence):
    """Examples picked from stores: `positions` index the parts' examples laid end to end. An int
    index gives an `Example` (token arrays copied out of the map); a slice or an index array gives
    another view. Memory: 8 bytes an example, whatever their length."""

    def __init__(self, parts: Sequence[Part], positions: np.ndarray):
        self.parts = tuple(parts)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.bounds = np.cumsum([0, *(len(part.store) for part in self.parts)])

    @classmethod
    def whole(cls, store: Store, row_offset: int = 0) -> Examples:
        return cls([Part(store, row_offset)], np.arange(len(store)))

    @classmethod
    def join(cls, views: Sequence[Examples]) -> Examples:
        """The views one after another (their parts side by side)."""
        parts, positions, base = [], [], 0
        for view in views:
            parts += view.parts
            positions.append(view.positions + base)
            base += int(view.bounds[-1])
        return cls(parts, np.concatenate([np.zeros(0, np.int64), *positions]))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Examples(self.parts, self.positions[index])
        if isinstance(index, (list, np.ndarray)):
            return self.take(index)
        position = int(self.positions[index])
        part = 0 if len(self.parts) == 1 else int(np.searchsorted(self.bounds, position, side="right")) - 1
        return self.parts[part].store.example(position - int(self.bounds[part]), self.parts[part].row_offset)

    def __iter__(self) -> Iterator[Example]:
        for index in range(len(self)):
            yield self[index]

    def __eq__(self, other) -> bool:
        """The same examples in the same order (as lists of examples compare), wherever they are stored."""
        if not isinstance(other, (Examples, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None  # compared by content, like a list

    def __repr__(self) -> str:
        return f"Examples({len(self):,} from {len(self.parts)} store(s))"

    def take(self, indices) -> Examples:
        """The examples at `indices` (an int array or a boolean mask over this view), in that order."""
        return Examples(self.parts, self.positions[np.asarray(indices)])

    def part_numbers(self) -> np.ndarray:
        """Which of `parts` each example comes from."""
        return np.searchsorted(self.bounds, self.positions, side="right") - 1

    def _gather(self, column: str) -> np.ndarray:
        """A per-example array of the stores (row_ids, questions, trained, instances, lengths) at this view's
        positions."""
        parts = self.part_numbers()
        gathered = np.empty(len(self), np.int64)
        for number, part in enumerate(self.parts):
            chosen = parts == number
            if not chosen.any():
                continue
            local = self.positions[chosen] - self.bounds[number]
            if column == "lengths":
                gathered[chosen] = part.store.offsets[local + 1] - part.store.offsets[local]
            else:
                gathered[chosen] = getattr(part.store, column)[local] + (part.row_offset if column == "row_ids" else 0)
        return gathered

    def row_ids(self) -> np.ndarray:
        return self._gather("row_ids")

    def questions(self) -> np.ndarray:
        return self._gather("questions")

    def instances(self) -> np.ndarray:
        return self._gather("instances")

    def lengths(self) -> np.ndarray:
        return self._gather("lengths")

    def trained_tokens(self) -> np.ndarray:
        """Tokens the loss is taken on per example: labels that are not -100, the first aside."""
        return self._gather("trained")
