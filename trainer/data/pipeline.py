"""The data pipeline: datasets -> validated rows -> token ids with labels -> train and held-out
examples, checked and summarised before training (`build_datasets`), and back from held-out
examples to the rows they came from (`held_out_rows`).

    sources.py   finding and reading files and hub datasets
    formats.py   formats, column mapping, bad rows
    encoding.py  rows -> token ids with labels: instruction_templates.py, chat_templates.py,
                 tokenizer_checks.py (BOS/EOS) and examples.py (the length policy)
    building.py  a dataset read and tokenised a chunk at a time, on all cores, into its store
    store.py     tokenised examples on disk, memory-mapped; train and held-out sets as index arrays
    cache.py     where stores live, keyed by everything they depend on
    stats.py     label checks and the per-dataset table
    leakage.py   held-out questions repeated in training

Examples keep the row id they came from (rows of a mixture numbered one dataset after another),
so a bad batch can be traced back to the rows in it. Every step below works on the stores'
per-example arrays (row ids, question hashes, lengths), never on all examples as objects, so
memory does not grow with the number of rows beyond 8 bytes an example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.config import DataConfig, DataSource
from trainer.data import cache
from trainer.data.building import build_store
from trainer.data.chat_templates import chat_template
from trainer.data.formats import DataError, validate_records
from trainer.data.instruction_templates import TEMPLATES, template_note
from trainer.data.leakage import leakage_note
from trainer.data.sources import locate, read_source
from trainer.data.stats import DataStats, check_store, dataset_summary, unread_note
from trainer.data.store import Examples, Store
from trainer.data.tasks import resolve_dataset
from trainer.data.tokenizer_checks import check_tokenizer


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
    filled_columns: dict[str, int]  # column -> rows with a value in it
    store: Store
    cache: str  # hit | miss | off

    @property
    def examples(self) -> Examples:
        return Examples.whole(self.store)


def load_source(source: DataSource, config: DataConfig, tokenizer, workers: int | None = None) -> LoadedSource:
    """One dataset read, validated and tokenised into its store, or the store from the cache.
    `workers`: processes that tokenise (default: all cores)."""
    located = locate(source.path, source.split, config.streaming)
    settings = {"split": source.split, "format": source.format, "columns": source.columns,
                "template": config.template, "max_seq_len": config.max_seq_len, "on_too_long": config.on_too_long,
                "on_bad_row": config.on_bad_row, "train_on_prompt": config.train_on_prompt,
                "max_rows": config.max_rows}
    key = cache.cache_key(located.identity, tokenizer, settings) if config.cache else None
    store = cache.load(key) if key else None
    if store is not None:
        return _loaded(store, "hit", located.name)
    if key:
        try:
            return _loaded(build_store(located, source, config, tokenizer, cache.path_for(key), workers), "miss",
                           located.name)
        except OSError as error:  # a cache that cannot be written costs time, not the run
            print(f"warning: could not cache the tokenised data at {cache.path_for(key)}: {error}", flush=True)
    store = build_store(located, source, config, tokenizer, cache.scratch_path(), workers)
    cache.forget(store)
    return _loaded(store, "off" if not key else "miss", located.name)


def _loaded(store: Store, outcome: str, name: str) -> LoadedSource:
    """`name`: the dataset as this run names it (a cached store keeps the name of the run that built it,
    which may have spelled the same file another way, relative to another directory)."""
    info = store.info
    return LoadedSource(name, info["format"], info["records"], info["outcomes"], info.get("filled_columns", {}), store,
                        outcome)


def build_datasets(config: DataConfig, tokenizer, seed: int) -> tuple[Examples, Examples, DataStats]:
    """Train and held-out examples, and the stats printed before training (str() is a table).

    Each dataset is split into train and held-out rows by a seeded permutation of its rows (all
    instances of a task on the same side). Training rows asking a held-out question (of any
    dataset, or of eval_path) are counted as leaked and, with data.drop_leaked, dropped; then the
    train rows are weighted. Held-out rows never are."""
    notes = check_tokenizer(tokenizer)
    sources = training_sources(config)
    loaded = [load_source(source, config, tokenizer) for source in sources]
    separate_eval = load_source(eval_source(config), config, tokenizer) if config.eval_path else None
    read = [*zip(sources, loaded), *([(eval_source(config), separate_eval)] if separate_eval else [])]
    notes += [note for source, part in read
              if (note := unread_note(part.name, part.format, source.columns, part.filled_columns)) is not None]
    splits, held_out = _split(loaded, separate_eval, config, tokenizer, seed)
    train, summaries = _train_side(sources, loaded, splits, held_out.questions(), config.drop_leaked, seed)
    if separate_eval is not None:
        summaries.append(_summary(separate_eval, None, 0, len(held_out), 0))
    n_leaked = sum(summary["leaked"] for summary in summaries)
    leakage = leakage_note(n_leaked, sum(len(part_train) for part_train, _ in splits), len(held_out),
                           dropped=config.drop_leaked)
    if separate_eval is None and len(held_out) > config.max_eval_rows:
        # The split took them out of training already: say so, rather than lose them unseen.
        notes.append(f"{len(held_out) - config.max_eval_rows:,} of the {len(held_out):,} held-out examples "
                     f"(data.eval_fraction={config.eval_fraction:g}) are over data.max_eval_rows="
                     f"{config.max_eval_rows}: neither trained on nor evaluated; lower data.eval_fraction or raise "
                     f"data.max_eval_rows to use them")
    elif separate_eval is not None and len(held_out) > config.max_eval_rows > 0:  # 0 has its own note below
        notes.append(f"data.eval_path has {len(held_out):,} examples; {config.max_eval_rows:,} of them (a seeded "
                     f"sample) are scored at each evaluation, as data.max_eval_rows={config.max_eval_rows} caps "
                     f"them; raise data.max_eval_rows to score more (each evaluation takes longer)")
    held_out = _capped(held_out, config.max_eval_rows, [seed, len(loaded)])
    if any(part.format == "chat" for part in loaded) or config.template == "chat":
        notes.append(chat_template(tokenizer)[1])
        if config.template != "chat":
            notes.append("chat rows are rendered with the chat template, whatever data.template says")
    if (note := template_note(tokenizer, config.template)) is not None:
        notes.append(note)
    if leakage is not None:
        notes.append(leakage)
    if not len(held_out) and (config.eval_path or config.eval_fraction > 0):  # asked for, yet none
        rounds_to_none = not any(round(part.records * config.eval_fraction) for part in loaded)  # as _held_out_records
        why = ("data.max_eval_rows=0" if config.max_eval_rows == 0 else "data.eval_path gave none" if config.eval_path
               else f"data.eval_fraction={config.eval_fraction:g} of these rows rounds to none" if rounds_to_none
               else "the rows held out were all dropped or skipped: see above")
        notes.append(f"no held-out example ({why}): nothing is evaluated and no checkpoint is marked best")
    return train, held_out, _stats(config, train, held_out, summaries, notes)


def training_sources(config: DataConfig) -> list[DataSource]:
    """The datasets trained on: data.mixture, or data.path alone."""
    return config.mixture or [DataSource(config.path, 1.0, config.split, config.format, config.columns)]


def rows_by_file(train_set: Examples, config: DataConfig, row_ids: list[int]) -> list[tuple[str, list[int]]]:
    """Training row ids (numbered on across the datasets of a mixture) -> (the file as this run names
    it, the rows within that file, 0-based) for each dataset they are in, in the datasets' order.
    `train_set` is `build_datasets(config, ...)`'s."""
    offsets = np.array([part.row_offset for part in train_set.parts])
    numbers = np.searchsorted(offsets, np.asarray(row_ids, np.int64), side="right") - 1
    sources = training_sources(config)
    return [(resolve_dataset(sources[number].path),
             [row_id - int(offsets[number]) for row_id, n in zip(row_ids, numbers.tolist()) if n == number])
            for number in sorted(set(numbers.tolist()))]


def eval_source(config: DataConfig) -> DataSource:
    return DataSource(config.eval_path, 1.0, config.split, config.format, config.columns)


def _split(loaded: list[LoadedSource], separate_eval: LoadedSource | None, config: DataConfig, tokenizer,
           seed: int) -> tuple[list[tuple[Examples, Examples]], Examples]:
    """Each dataset's (train, held-out) examples, numbered on across datasets, and all held-out ones
    (data.eval_path's when given, else every dataset's held-out part)."""
    splits, offset = [], 0
    for index, part in enumerate(loaded):
        examples = _numbered(part, offset, tokenizer, config.template)
        if separate_eval is not None:
            splits.append((examples, examples.take(np.zeros(0, np.int64))))
        else:
            is_held_out = np.zeros(part.records, dtype=bool)
            is_held_out[_held_out_records(part.records, config.eval_fraction, [seed, index])] = True
            held = is_held_out[part.store.row_ids]  # the store's own row ids: positions in this dataset
            splits.append((examples.take(~held), examples.take(held)))
        offset += part.records
    held_out = (_numbered(separate_eval, offset, tokenizer, config.template) if separate_eval is not None
                else Examples.join([part_eval for _, part_eval in splits]))
    return splits, held_out


def _train_side(sources: list[DataSource], loaded: list[LoadedSource], splits: list[tuple[Examples, Examples]],
                held_questions: np.ndarray, drop_leaked: bool, seed: int) -> tuple[Examples, list[dict[str, Any]]]:
    """The training examples of all datasets (leaked ones dropped if asked, then weighted), and a
    summary per dataset."""
    train, summaries = [], []
    for index, (source, part, (part_train, part_eval)) in enumerate(zip(sources, loaded, splits)):
        leaked = np.isin(part_train.questions(), held_questions)
        if drop_leaked:
            part_train = part_train.take(~leaked)
        part_train = weighted(part_train, source.weight, [seed, index])
        train.append(part_train)
        summaries.append(_summary(part, source.weight, len(part_train), len(part_eval), int(leaked.sum())))
    return Examples.join(train), summaries


def _capped(held_out: Examples, max_rows: int, seed: list[int]) -> Examples:
    """At most `max_rows` held-out examples: a seeded sample, in their original order."""
    if len(held_out) <= max_rows:
        return held_out
    keep = np.random.default_rng(seed).choice(len(held_out), max_rows, replace=False)
    return held_out.take(np.sort(keep))


def _stats(config: DataConfig, train: Examples, held_out: Examples, summaries: list[dict[str, Any]],
           notes: list[str]) -> DataStats:
    caches = {summary["cache"] for summary in summaries}
    return DataStats(
        train_examples=len(train), eval_examples=len(held_out),
        template=config.template if config.template in (*TEMPLATES, "chat") else "custom",
        max_seq_len=config.max_seq_len, cache=caches.pop() if len(caches) == 1 else "partial",
        dropped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("dropped")),
        skipped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("skipped")),
        leaked=sum(summary["leaked"] for summary in summaries), datasets=summaries, notes=notes)


def _numbered(part: LoadedSource, offset: int, tokenizer, template: str) -> Examples:
    """The dataset's examples, checked, with row ids counted on from the datasets before it."""
    use_chat = part.format == "chat" or template == "chat"
    check_store(part.store, tokenizer, lambda row_id: f"{part.name}: row {row_id + 1}", use_chat)
    return Examples.whole(part.store, row_offset=offset)


def _summary(part: LoadedSource, weight: float | None, train: int, held_out: int, leaked: int) -> dict[str, Any]:
    summary = dataset_summary(part.name, part.format, part.records, part.outcomes, part.store)
    return {**summary, "weight": weight, "train": train, "eval": held_out, "leaked": leaked, "cache": part.cache}


def _held_out_records(count: int, eval_fraction: float, seed: int | list[int]) -> np.ndarray:
    """The held-out ones of row positions 0..count-1, sorted: a deterministic, seeded split."""
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:int(round(count * eval_fraction))])


def weighted(examples: Examples, weight: float, seed: list[int]) -> Examples:
    """`weight` x the examples: every one floor(weight) times, plus a seeded sample for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    extra = np.random.default_rng(seed).choice(len(examples), int(round(fraction * len(examples))), replace=False)
    return examples.take(np.concatenate([np.tile(np.arange(len(examples)), int(whole)), np.sort(extra)]))


def held_out_rows(data: DataConfig, held_out: Examples) -> list[dict]:
    """The rows held-out examples of `build_datasets(data, ...)` were made from, in their order:
    read again from each example's dataset, only the records wanted. The datasets are this run's
    (`data`), not the paths a cached store was first written from, which may be relative to
    another directory; a task's instances are told apart by the instance number each example keeps."""
    if not len(held_out):
        return []
    sources = [eval_source(data)] if data.eval_path else training_sources(data)
    if len(sources) != len(held_out.parts):
        raise ValueError(f"held_out_rows: {len(held_out.parts)} datasets in the held-out examples, {len(sources)} "
                         f"in the data config: pass the config build_datasets made them with")
    row_ids, parts, instances = held_out.row_ids(), held_out.part_numbers(), held_out.instances()
    by_id: dict[int, dict[int, dict]] = {}
    for number in np.unique(parts).tolist():
        part = held_out.parts[number]
        by_id.update(_rows_by_id(sources[number], data, part.store.info, part.row_offset,
                                 np.unique(row_ids[parts == number]).tolist()))
    return [by_id[row_id][instance] for row_id, instance in zip(row_ids.tolist(), instances.tolist())]


def _rows_by_id(source: DataSource, data: DataConfig, info: dict[str, Any], row_offset: int,
                wanted: list[int]) -> dict[int, dict[int, dict]]:
    """The `wanted` rows (ids as `build_datasets` numbers them) of `source`, by instance number (a
    task's instances; 0 alone for the other formats), validated as when its store was written
    (`info`: its format)."""
    located = locate(source.path, source.split, data.streaming)
    records = located.pick([row_id - row_offset for row_id in wanted])
    if len(records) != len(wanted):
        raise DataError(f"{located.name}: fewer rows than the {info['records']} its examples were made from: "
                        f"the file changed during this run; run again")
    by_id: dict[int, dict[int, dict]] = {}
    for row_id, record in zip(wanted, records):
        rows, _ = validate_records(located.name, [record], row_id - row_offset, info["format"], source.columns,
                                   data.on_bad_row)
        by_id[row_id] = {row.instance: row.fields for row in rows}
    return by_id
