"""The data pipeline: datasets -> validated rows -> token ids with labels -> train and held-out
examples, checked and summarised before training (`build_datasets`), and back from held-out
examples to the rows they came from (`held_out_rows`).

    formats.py   reading files and hub datasets, formats, column mapping, bad rows
    encoding.py  prompt and chat templates, BOS/EOS, the length policy
    cache.py     tokenised datasets on disk, keyed by everything they depend on
    stats.py     label checks and the per-dataset table
    leakage.py   held-out questions repeated in training

Examples keep the row id they came from (rows of a mixture numbered one dataset after another),
so a bad batch can be traced back to the rows in it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.config import DataConfig, DataSource
from trainer.data import cache
from trainer.data.encoding import TEMPLATES, Example, chat_template, check_tokenizer, tokenize_rows
from trainer.data.formats import locate, read_source
from trainer.data.leakage import leakage_note
from trainer.data.stats import DataStats, check_labels, dataset_summary


def read_rows(path: str, split: str = "train", max_rows: int | None = None, *, format: str = "auto",
              columns: dict[str, str] | None = None, on_bad_row: str = "error") -> list[dict[str, Any]]:
    """Validated rows of one dataset: {instruction, input, output} or {messages}."""
    return [row.fields for row in read_source(locate(path, split), format, columns, max_rows, on_bad_row).rows]


@dataclass
class LoadedSource:
    name: str
    format: str
    records: int  # records read; example row ids are positions among them
    outcomes: dict[str, int]  # "truncated", "dropped: ...", "skipped: ..." -> rows
    examples: list[Example]
    cache: str  # hit | miss | off


def load_source(source: DataSource, config: DataConfig, tokenizer) -> LoadedSource:
    """One dataset read, validated and tokenised, or taken from the cache."""
    located = locate(source.path, source.split)
    settings = {"split": source.split, "format": source.format, "columns": source.columns,
                "template": config.template, "max_seq_len": config.max_seq_len, "on_too_long": config.on_too_long,
                "on_bad_row": config.on_bad_row, "train_on_prompt": config.train_on_prompt,
                "max_rows": config.max_rows}
    key = cache.cache_key(located.identity, tokenizer, settings) if config.cache else None
    cached = cache.load(key) if key else None
    if cached is not None:
        examples, info = cached
        return LoadedSource(**info, examples=examples, cache="hit")
    rows = read_source(located, source.format, source.columns, config.max_rows, config.on_bad_row)
    examples, counts = tokenize_rows(tokenizer, rows.rows, rows.format, config, rows.name)
    info = {"name": rows.name, "format": rows.format, "records": rows.records,
            "outcomes": {**{f"skipped: {why}": n for why, n in rows.bad.items()}, **counts}}
    if key:
        cache.save(key, examples, info)
    return LoadedSource(**info, examples=examples, cache="miss" if key else "off")


def build_datasets(config: DataConfig, tokenizer, seed: int) -> tuple[list[Example], list[Example], DataStats]:
    """Train and held-out examples, and the stats printed before training (str() is a table).

    Each dataset is split into train and held-out rows by a seeded permutation of its rows (all
    instances of a task on the same side). Training rows asking a held-out question (of any
    dataset, or of eval_path) are counted as leaked and, with data.drop_leaked, dropped; then the
    train rows are weighted. Held-out rows never are."""
    notes = check_tokenizer(tokenizer)
    sources = training_sources(config)
    loaded = [load_source(source, config, tokenizer) for source in sources]
    separate_eval = load_source(eval_source(config), config, tokenizer) if config.eval_path else None
    splits, held_out = _split(loaded, separate_eval, config, tokenizer, seed)
    train, summaries = _train_side(sources, loaded, splits, {e.question for e in held_out}, config.drop_leaked, seed)
    if separate_eval is not None:
        summaries.append(_summary(separate_eval, None, 0, len(held_out), 0))
    n_leaked = sum(summary["leaked"] for summary in summaries)
    leakage = leakage_note(n_leaked, sum(len(part_train) for part_train, _ in splits), len(held_out),
                           dropped=config.drop_leaked)
    held_out = _capped(held_out, config.max_eval_rows, [seed, len(loaded)])
    if any(part.format == "chat" for part in loaded) or config.template == "chat":
        notes.append(chat_template(tokenizer)[1])
        if config.template != "chat":
            notes.append("chat rows are rendered with the chat template, whatever data.template says")
    if leakage is not None:
        notes.append(leakage)
    return train, held_out, _stats(config, train, held_out, summaries, notes)


def training_sources(config: DataConfig) -> list[DataSource]:
    """The datasets trained on: data.mixture, or data.path alone."""
    return config.mixture or [DataSource(config.path, 1.0, config.split, config.format, config.columns)]


def eval_source(config: DataConfig) -> DataSource:
    return DataSource(config.eval_path, 1.0, config.split, config.format, config.columns)


def _split(loaded: list[LoadedSource], separate_eval: LoadedSource | None, config: DataConfig, tokenizer,
           seed: int) -> tuple[list[tuple[list[Example], list[Example]]], list[Example]]:
    """Each dataset's (train, held-out) examples, numbered on across datasets, and all held-out ones
    (data.eval_path's when given, else every dataset's held-out part)."""
    splits, offset = [], 0
    for index, part in enumerate(loaded):
        examples = _numbered(part, offset, tokenizer, config.template)
        if separate_eval is not None:
            splits.append((examples, []))
        else:
            _, eval_records = split_rows(part.records, config.eval_fraction, [seed, index])
            held = {record + offset for record in eval_records}
            splits.append(([e for e in examples if e.row_id not in held], [e for e in examples if e.row_id in held]))
        offset += part.records
    held_out = (_numbered(separate_eval, offset, tokenizer, config.template) if separate_eval is not None
                else [e for _, part_eval in splits for e in part_eval])
    return splits, held_out


def _train_side(sources: list[DataSource], loaded: list[LoadedSource],
                splits: list[tuple[list[Example], list[Example]]], held_questions: set, drop_leaked: bool,
                seed: int) -> tuple[list[Example], list[dict[str, Any]]]:
    """The training examples of all datasets (leaked ones dropped if asked, then weighted), and a
    summary per dataset."""
    train, summaries = [], []
    for index, (source, part, (part_train, part_eval)) in enumerate(zip(sources, loaded, splits)):
        leaked = sum(e.question in held_questions for e in part_train)
        if drop_leaked:
            part_train = [e for e in part_train if e.question not in held_questions]
        part_train = weighted(part_train, source.weight, [seed, index])
        train += part_train
        summaries.append(_summary(part, source.weight, len(part_train), len(part_eval), leaked))
    return train, summaries


def _capped(held_out: list[Example], max_rows: int, seed: list[int]) -> list[Example]:
    """At most `max_rows` held-out examples: a seeded sample, in their original order."""
    if len(held_out) <= max_rows:
        return held_out
    keep = np.random.default_rng(seed).choice(len(held_out), max_rows, replace=False)
    return [held_out[i] for i in sorted(keep.tolist())]


def _stats(config: DataConfig, train: list[Example], held_out: list[Example], summaries: list[dict[str, Any]],
           notes: list[str]) -> DataStats:
    caches = {summary["cache"] for summary in summaries}
    return DataStats(
        train_examples=len(train), eval_examples=len(held_out),
        template=config.template if config.template in (*TEMPLATES, "chat") else "custom",
        max_seq_len=config.max_seq_len, cache=caches.pop() if len(caches) == 1 else "partial",
        dropped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("dropped")),
        skipped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("skipped")),
        leaked=sum(summary["leaked"] for summary in summaries), datasets=summaries, notes=notes)


def _numbered(part: LoadedSource, offset: int, tokenizer, template: str) -> list[Example]:
    """The dataset's examples, checked, with row ids counted on from the datasets before it."""
    use_chat = part.format == "chat" or template == "chat"
    check_labels(part.examples, tokenizer, lambda row_id: f"{part.name}: row {row_id + 1}", use_chat)
    return [Example(e.row_id + offset, e.input_ids, e.labels, e.question) for e in part.examples]


def _summary(part: LoadedSource, weight: float | None, train: int, held_out: int, leaked: int) -> dict[str, Any]:
    summary = dataset_summary(part.name, part.format, part.records, part.outcomes, part.examples)
    return {**summary, "weight": weight, "train": train, "eval": held_out, "leaked": leaked, "cache": part.cache}


def split_rows(count: int, eval_fraction: float, seed: int | list[int]) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of row positions 0..count-1."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_eval = int(round(count * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def weighted(examples: list[Example], weight: float, seed: list[int]) -> list[Example]:
    """`weight` x the examples: every one floor(weight) times, plus a seeded sample for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    extra = np.random.default_rng(seed).choice(len(examples), int(round(fraction * len(examples))), replace=False)
    return examples * int(whole) + [examples[i] for i in sorted(extra.tolist())]


def held_out_rows(data: DataConfig, held_out: list[Example]) -> list[dict]:
    """The rows held-out examples of `build_datasets(data, ...)` were made from, in their order."""
    if not held_out:
        return []
    by_id = _rows_by_id(data, {example.row_id for example in held_out})
    taken: Counter = Counter()
    rows = []
    for example in held_out:
        # Instances of one task share a row id and come in file order.
        candidates = by_id[example.row_id]
        rows.append(candidates[min(taken[example.row_id], len(candidates) - 1)])
        taken[example.row_id] += 1
    return rows


def _rows_by_id(data: DataConfig, wanted: set[int]) -> dict[int, list[dict]]:
    """The `wanted` rows by the id `build_datasets` gives their examples: the record's position,
    counted on across the datasets of a mixture, then the separate held-out file."""
    sources = [*training_sources(data), *([eval_source(data)] if data.eval_path else [])]
    by_id: dict[int, list[dict]] = defaultdict(list)
    offset = 0
    for source in sources:
        read = read_source(locate(source.path, source.split), source.format, source.columns, data.max_rows,
                           data.on_bad_row)
        for row in read.rows:
            if offset + row.record in wanted:
                by_id[offset + row.record].append(row.fields)
        offset += read.records
    return by_id
