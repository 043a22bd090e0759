"""What the model will be trained on, per dataset, checked before the first step.

`check_labels` stops the run on labels that would train the wrong thing silently: padding that is
EOS, no trained EOS (the model never learns to stop), an example with no trained token, a BOS
missing or doubled. It runs on a store a chunk of examples at a time (`check_store`), so it holds
one chunk, not the dataset. `DataStats` prints as a table, one line per dataset.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import DataConfig
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.formats import DataError, unread_columns
from trainer.data.store import Store, trained_mask
from trainer.data.tokenizer_checks import document_bos, expected_first_token


def check_labels(examples: Sequence[Example], tokenizer, describe: Callable[[int], str],
                 use_chat: bool = False) -> None:
    """Raise DataError naming the first offending row. `describe(row_id)` says where a row came from;
    `use_chat`: the examples are rendered with the chat template."""
    _check_pad(tokenizer)
    if not examples:
        return
    for example in examples:
        if len(example.labels) != len(example.input_ids) or not example.input_ids:
            raise DataError(f"{describe(example.row_id)}: labels and input ids differ in length, or are empty")
    ids, labels, starts, _ = flatten(examples)
    row_ids = np.array([example.row_id for example in examples], dtype=np.int64)
    _check_chunks([(ids, labels, starts, row_ids)], tokenizer, describe, use_chat)


def check_store(store: Store, tokenizer, describe: Callable[[int], str], use_chat: bool = False) -> None:
    """`check_labels` over a store's examples, read a chunk at a time."""
    _check_pad(tokenizer)
    if not len(store):
        return
    empty = store.lengths() == 0
    if empty.any():
        raise DataError(f"{describe(int(store.row_ids[np.argmax(empty)]))}: labels and input ids differ in length, "
                        f"or are empty")
    chunks = ((ids, labels, starts, np.asarray(store.row_ids[first:first + len(starts)]))
              for first, ids, labels, starts in store.chunks())
    _check_chunks(chunks, tokenizer, describe, use_chat)


def _check_pad(tokenizer) -> None:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None or pad == eos:
        raise DataError(f"the pad token is {'missing' if pad is None else 'EOS'}: padding and the EOS "
                        f"label would be the same token, and the model would never learn to stop")


def _check_chunks(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], tokenizer,
                  describe: Callable[[int], str], use_chat: bool) -> None:
    """Each check over all chunks of (ids, labels, example starts, row ids); the first check that
    fails names its first offending example, as over the examples in one piece."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    first, first_name = expected_first_token(tokenizer, use_chat)
    document = document_bos(tokenizer)
    eos_trained, order, first_bad = False, [], {}
    for ids, labels, starts, row_ids in chunks:
        lengths = np.diff(np.append(starts, len(ids)))
        trained = trained_mask(labels, starts)
        ends = starts + lengths - 1
        eos_trained = eos_trained or bool((labels[ends] == eos).any())
        second = np.minimum(starts + 1, len(ids) - 1)  # a one-token example has no second token
        not_input = (labels != IGNORE_INDEX) & (labels != ids)
        checks = [
            ("labels are not the input ids (masked or equal)", _per_example(not_input, starts)),
            ("no trained token", ~_per_example(trained, starts)),
            (f"does not end in a trained EOS (id {eos})", labels[ends] != eos),
        ]
        if pad != tokenizer.unk_token_id:  # unk doubles as pad on some tokenizers, and may appear in text
            checks.append((f"the pad token (id {pad}) is a trained label",
                           _per_example(trained & (labels == pad), starts)))
        if first is not None:
            bad_start = ids[starts] != first
            if first == document:  # a document BOS must not be doubled either
                bad_start |= (lengths > 1) & (ids[second] == first)
            checks.append((f"does not start with {first_name}", bad_start))
        order = [problem for problem, _ in checks]
        for problem, bad in checks:
            if problem not in first_bad and bad.any():
                first_bad[problem] = int(row_ids[np.argmax(bad)])
    if not eos_trained:
        raise DataError(f"EOS (id {eos}) is never a trained label: the model would never learn to stop")
    for problem in order:
        if problem in first_bad:
            raise DataError(f"{describe(first_bad[problem])}: {problem}")


def flatten(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All examples' ids and labels end to end, with each example's start and length."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter(chain.from_iterable(e.labels for e in examples), dtype=np.int64, count=int(lengths.sum()))
    return ids, labels, starts, lengths


def _per_example(flags: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.logical_or.reduceat(flags, starts)


def dataset_summary(name: str, format: str, records: int, outcomes: dict[str, int], store: Store) -> dict[str, Any]:
    """Token counts over a dataset's examples (train and held out, before weighting)."""
    summary = {"name": name, "format": format, "rows": records, "examples": len(store),
               "outcomes": dict(outcomes), "mean_tokens": 0.0, "max_tokens": 0, "trained_fraction": 0.0}
    if len(store):
        lengths = store.lengths()
        # The per-example counts of trained tokens (the first label aside), as store.trained_mask counts them.
        trained = int(np.sum(store.trained, dtype=np.int64))
        summary.update(mean_tokens=round(float(lengths.mean()), 1), max_tokens=int(lengths.max()),
                       trained_fraction=round(trained / int(lengths.sum()), 4))
    return summary


class DataStats(dict):
    """The stats dict; str() is the table (the loop prints f"data: {stats}")."""

    def __str__(self) -> str:
        return format_stats(self)


def chat_rendered(stats: dict[str, Any]) -> bool:
    """Whether a trained dataset is in chat format: its rows took the chat template whatever data.template
    says, so conversations with the adapter are written with it (meta.json's chat_rendered)."""
    return any(d["format"] == "chat" and d["weight"] is not None for d in stats["datasets"])


def format_stats(stats: dict[str, Any]) -> str:
    header = (f"{stats['train_examples']:,} train / {stats['eval_examples']:,} held-out examples, "
              f"template {stats['template']}, max_seq_len {stats['max_seq_len']}, cache {stats['cache']}")
    columns = ("dataset", "format", "rows", "skipped", "cut", "dropped", "leaked", "weight", "train", "eval",
               "mean tok", "max tok", "trained")
    lines = []
    for d in stats["datasets"]:
        outcomes = d["outcomes"]
        lines.append((_short(d["name"]), d["format"], f"{d['rows']:,}", _count(outcomes, "skipped"),
                      f"{outcomes.get('truncated', 0):,}", _count(outcomes, "dropped"), f"{d['leaked']:,}",
                      "eval" if d["weight"] is None else f"{d['weight']:g}",
                      f"{d['train']:,}", f"{d['eval']:,}", f"{d['mean_tokens']:.1f}", f"{d['max_tokens']:,}",
                      f"{100 * d['trained_fraction']:.1f}%"))
    widths = [max(len(row[i]) for row in [columns, *lines]) for i in range(len(columns))]
    table = ["  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w)
                              in enumerate(zip(row, widths))) for row in [columns, *lines]]
    reasons = [f"  {_short(d['name'])}: {why}: {n:,}" for d in stats["datasets"]
               for why, n in sorted(d["outcomes"].items()) if why != "truncated"]
    notes = [f"  note: {note}" for note in stats["notes"]]
    return "\n".join([header, *table, *reasons, *notes])


def unread_note(name: str, format: str, columns: dict[str, str], filled: dict[str, int]) -> str | None:
    """The note on a dataset's columns that hold values no field reads, if any; `filled`: its
    `formats.filled_columns`, `columns`: its data.columns."""
    unread = unread_columns(filled, format, columns)
    if not unread:
        return None
    listed = ", ".join(f"{column!r} (a value in {n:,} row{'' if n == 1 else 's'})" for column, n in unread.items())
    several = len(unread) > 1
    note = (f"{_short(name)}: column{'s' if several else ''} {listed} {'are' if several else 'is'} in the data but no "
            f"field reads {'them' if several else 'it'}")
    if format == "alpaca" and not any(columns.get(column, column) == "input" for column in filled):
        # The usual slip: a dataset's `context` left unmapped, its rows trained with an empty input.
        note += ("; every row's input is empty: data.columns.<column>=input maps the one that belongs there"
                 if several else f"; every row's input is empty: data.columns.{next(iter(unread))}=input maps it there")
    return note


def no_training_examples(stats: dict[str, Any], config: DataConfig) -> str:
    """Why no example is left to train on, per dataset: the rows read and where they went (the data
    table's counts: the table is never printed then), and what to change."""
    trained = [d for d in stats["datasets"] if d["weight"] is not None]  # data.eval_path's never is
    accounts = "; ".join(f"{_short(d['name'])}: {d['rows']:,} row{'' if d['rows'] == 1 else 's'} read: "
                         + ", ".join(_where_rows_went(d, config)) for d in trained)
    return f"no training examples left. {accounts}. To keep some: {'; '.join(_fixes(trained, config))}"


def _where_rows_went(d: dict[str, Any], config: DataConfig) -> list[str]:
    went = []
    for kind in ("skipped", "dropped"):
        reasons = {why.split(": ", 1)[1]: n for why, n in sorted(d["outcomes"].items()) if why.startswith(kind)}
        if reasons:
            listed = ", ".join(f"{why} for data.max_seq_len={config.max_seq_len}: {n:,}" if "too long" in why
                               else f"{why}: {n:,}" for why, n in reasons.items())
            went.append(f"{sum(reasons.values()):,} {kind} ({listed})")
    if d["eval"]:
        went.append(f"{d['eval']:,} held out")
    if d["leaked"] and config.drop_leaked:
        went.append(f"{d['leaked']:,} dropped for repeating a held-out question")
    if _left_before_weighting(d, config):
        went.append(f"{_left_before_weighting(d, config):,} left out by weight {d['weight']:g}")
    return went


def _left_before_weighting(d: dict[str, Any], config: DataConfig) -> int:
    """The examples left for training before weighting: all sampled away by a weight under 1, when none trains."""
    return d["examples"] - d["eval"] - (d["leaked"] if config.drop_leaked else 0)


def _fixes(trained: list[dict[str, Any]], config: DataConfig) -> list[str]:
    reasons = {why for d in trained for why, n in d["outcomes"].items() if n}
    fixes = []
    if any(why.startswith("dropped") for why in reasons):
        fixes.append(f"raise data.max_seq_len (now {config.max_seq_len})"
                     + (" or set data.on_too_long=truncate_prompt" if "dropped: too long" in reasons else ""))
    if any(why.startswith("skipped") for why in reasons):
        fixes.append("fix the skipped rows (data.on_bad_row=error stops at the first, naming it)")
    if any(d["eval"] for d in trained):
        fixes.append(f"lower data.eval_fraction (now {config.eval_fraction:g}) or hold out rows of another "
                     f"file with data.eval_path")
    if config.drop_leaked and any(d["leaked"] for d in trained):
        fixes.append("set data.drop_leaked=false to train on rows that repeat a held-out question")
    if any(_left_before_weighting(d, config) for d in trained):
        fixes.append("raise the dataset's weight in data.mixture")
    if config.max_rows is not None and any(d["rows"] >= config.max_rows for d in trained):  # the cap cut rows
        fixes.append(f"raise data.max_rows (now {config.max_rows:,})")
    return fixes


def _count(outcomes: dict[str, int], prefix: str) -> str:
    return f"{sum(n for why, n in outcomes.items() if why.startswith(prefix)):,}"


def _short(name: str) -> str:
    local = Path(name)
    return local.name if local.exists() else name
