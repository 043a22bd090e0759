"""One dataset -> its store: records read a chunk at a time, validated and tokenised on all cores,
appended in file order.

The main process reads records (a .jsonl file line by line, a streamed hub dataset record by
record) and hands out chunks of `CHUNK_ROWS` to a process pool whose workers hold the tokenizer
from their start; at most two chunks per worker are in flight, so memory holds a few chunks
whatever the dataset's size. Chunk boundaries
depend only on the records, and every chunk is tokenised alone and appended in order, so the
store's bytes are the same for one worker or many.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.config import DataConfig, DataSource
from trainer.data.encoding import encode_rows
from trainer.data.examples import EncodedRows
from trainer.data.formats import DataError, filled_columns, parsed, settle_format, validate_records
from trainer.data.sources import Located
from trainer.data.store import Store, StoreWriter
from trainer.runtime import distributed

CHUNK_ROWS = 4096  # records per task: large enough to batch the tokenizer, small enough to bound memory
IN_FLIGHT_PER_WORKER = 2  # one chunk tokenised while the next waits, per worker


@dataclass
class Job:
    """What every chunk of one dataset is tokenised with, besides the tokenizer."""
    name: str
    format: str
    columns: dict[str, str]
    config: DataConfig


@dataclass
class Chunk:
    records: int  # read, bad ones included
    bad: Counter  # reason -> records skipped (on_bad_row=skip)
    filled: Counter  # column -> records with a value in it
    encoded: EncodedRows


def build_store(located: Located, source: DataSource, config: DataConfig, tokenizer, path: Path,
                workers: int | None = None, chunk_rows: int = CHUNK_ROWS) -> Store:
    """Read, validate and tokenise `located` into a store at `path`. `workers`: processes that
    tokenise (default: every core this process may run on; one chunk alone is tokenised here)."""
    chunks = _chunked(located.read(config.max_rows), chunk_rows)
    first = next(chunks, [])
    job = Job(located.name, settle_format(located.name, first, source.format, source.columns), source.columns,
              config)
    workers = workers or len(os.sched_getaffinity(0))
    second = next(chunks, None)
    if second is None:
        workers = 1
    all_chunks = chain([first], [second] if second is not None else [], chunks)
    writer = StoreWriter(path)
    records, bad, outcomes, filled = 0, Counter(), Counter(), Counter()
    try:
        with _progress(located, config.max_rows, workers, shown=second is not None) as bar:
            for chunk in encoded_chunks(all_chunks, job, tokenizer, workers):
                writer.append(chunk.encoded)
                records += chunk.records
                bad.update(chunk.bad)
                filled.update(chunk.filled)
                outcomes.update(chunk.encoded.outcomes)
                bar.update(chunk.records)
    except BaseException:
        writer.abort()
        raise
    info = {"name": located.name, "format": job.format, "records": records,
            "outcomes": {**{f"skipped: {why}": n for why, n in bad.items()}, **outcomes},
            "filled_columns": dict(filled),
            "source": {"path": source.path, "split": source.split, "columns": source.columns,
                       "streaming": located.streamed}}
    return Store(writer.finish(info))


def encoded_chunks(chunks: Iterator[list[tuple[str, Any]]], job: Job, tokenizer, workers: int) -> Iterator[Chunk]:
    """Each chunk of records validated and tokenised, in order: here, or by `workers` processes."""
    numbered = _numbered(chunks)
    if workers <= 1:
        yield from (encode_chunk(tokenizer, job, first, records) for first, records in numbered)
        return
    # fork: workers start at once with the tokenizer they inherit (spawn would import torch and
    # transformers again in each, and send the tokenizer over a pipe).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        try:
            for first, records in numbered:
                pending.append(pool.submit(_encode_in_worker, job, first, records))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            for future in pending:
                future.cancel()


def encode_chunk(tokenizer, job: Job, first: int, records: list[tuple[str, Any]]) -> Chunk:
    """Records numbered from `first`: validated (bad ones raised or counted) and tokenised."""
    records = [(where, parsed(record)) for where, record in records]  # once, for both readers below
    rows, bad = validate_records(job.name, records, first, job.format, job.columns, job.config.on_bad_row)
    return Chunk(len(records), bad, filled_columns(records),
                 encode_rows(tokenizer, rows, job.format, job.config, job.name))


_worker_tokenizer = None


def _start_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # The workers are the parallelism: each tokenizer on one thread, not one per core each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(job: Job, first: int, records: list[tuple[str, Any]]) -> Chunk:
    return encode_chunk(_worker_tokenizer, job, first, records)


def _result(future) -> Chunk:
    try:
        return future.result()
    except DataError as error:  # raised in a worker: the message names the row; its traceback is the worker's
        raise DataError(str(error)) from None


def _chunked(records: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    while chunk := list(islice(records, size)):
        yield chunk


def _numbered(chunks: Iterator[list]) -> Iterator[tuple[int, list]]:
    first = 0
    for chunk in chunks:
        yield first, chunk
        first += len(chunk)


def _progress(located: Located, max_rows: int | None, workers: int, shown: bool) -> tqdm:
    """rows/s and the time left, on the rank that prints, for a dataset of more than one chunk (a
    stream: rows/s alone, its length is not known)."""
    shown = shown and distributed.is_main()
    return tqdm(total=located.count(max_rows) if shown else None, disable=not shown, unit=" rows", unit_scale=True,
                desc=f"tokenising {Path(located.name).name} ({workers} process{'es' if workers > 1 else ''})",
                dynamic_ncols=True, mininterval=1.0)
