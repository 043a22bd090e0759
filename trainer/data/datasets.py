"""Instruction data: datasets -> validated rows -> token ids with labels -> train and held-out
examples, checked and summarised before training.

    data_formats.py   reading files and hub datasets, formats, column mapping, bad rows
    data_tokenize.py  prompt and chat templates, BOS/EOS, the length policy
    cache.py     tokenised datasets on disk, keyed by everything they depend on
    data_stats.py     label checks and the per-dataset table

Examples keep the row id they came from (rows of a mixture numbered one dataset after another),
so a bad batch can be traced back to the rows in it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.data import cache
from trainer.config import DataConfig, DataSource
from trainer.data.formats import DataError, locate, read_source
from trainer.data.stats import DataStats, check_labels, dataset_summary, format_stats
from trainer.data.encoding import (IGNORE_INDEX, TEMPLATES, Example, chat_template, check_tokenizer,
                                   render_prompt, tokenize_rows)
from trainer.data.leakage import leakage_note

__all__ = ["IGNORE_INDEX", "TEMPLATES", "BatchPlan", "DataError", "DataStats", "Example", "build_datasets",
           "collate", "format_stats", "load_source", "read_rows", "render_prompt", "split_rows", "token_tensor"]


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
    sources = config.mixture or [DataSource(config.path, 1.0, config.split, config.format, config.columns)]
    loaded = [load_source(source, config, tokenizer) for source in sources]
    separate_eval = None
    if config.eval_path:
        eval_source = DataSource(config.eval_path, 1.0, config.split, config.format, config.columns)
        separate_eval = load_source(eval_source, config, tokenizer)
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
    held_questions = {e.question for e in held_out}
    train, summaries = [], []
    for index, (source, part, (part_train, part_eval)) in enumerate(zip(sources, loaded, splits)):
        leaked = sum(e.question in held_questions for e in part_train)
        if config.drop_leaked:
            part_train = [e for e in part_train if e.question not in held_questions]
        part_train = weighted(part_train, source.weight, [seed, index])
        train += part_train
        summaries.append(_summary(part, source.weight, len(part_train), len(part_eval), leaked))
    if separate_eval is not None:
        summaries.append(_summary(separate_eval, None, 0, len(held_out), 0))
    n_leaked = sum(summary["leaked"] for summary in summaries)
    n_train = sum(len(part_train) for part_train, _ in splits)
    leakage = leakage_note(n_leaked, n_train, len(held_out), dropped=config.drop_leaked)
    if len(held_out) > config.max_eval_rows:
        keep = np.random.default_rng([seed, len(loaded)]).choice(len(held_out), config.max_eval_rows, replace=False)
        held_out = [held_out[i] for i in sorted(keep.tolist())]
    if any(part.format == "chat" for part in loaded) or config.template == "chat":
        notes.append(chat_template(tokenizer)[1])
        if config.template != "chat":
            notes.append("chat rows are rendered with the chat template, whatever data.template says")
    if leakage is not None:
        notes.append(leakage)
    caches = {summary["cache"] for summary in summaries}
    stats = DataStats(
        train_examples=len(train), eval_examples=len(held_out),
        template=config.template if config.template in (*TEMPLATES, "chat") else "custom",
        max_seq_len=config.max_seq_len, cache=caches.pop() if len(caches) == 1 else "partial",
        dropped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("dropped")),
        skipped=sum(n for s in summaries for why, n in s["outcomes"].items() if why.startswith("skipped")),
        leaked=n_leaked, datasets=summaries, notes=notes)
    return train, held_out, stats


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


def token_tensor(ids) -> torch.Tensor:
    """An example's int32 token array as a tensor, sharing its memory (no element-wise copy)."""
    return torch.frombuffer(ids, dtype=torch.int32) if len(ids) else torch.zeros(0, dtype=torch.int32)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = token_tensor(example.input_ids)
        labels[i, :n] = token_tensor(example.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "row_ids": torch.tensor([e.row_id for e in examples])}


# ------------------------------------------------------------------------------ batch order


class BatchPlan:
    """The order examples are seen in: an endless stream over epochs, each epoch a fresh seeded
    permutation. Step s consumes stream positions [s*G, (s+1)*G) for the global batch G, so the
    data cursor is one number and resuming at any world size sees the same examples next."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        if n_examples == 0:
            raise DataError("no training examples left after splitting, length filtering and dropping rows "
                            "that repeat a held-out question")
        self.n_examples = n_examples
        self.global_batch = global_batch
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, epoch])
            if len(self._permutations) > 2:  # a step spans at most two epochs
                self._permutations.clear()
            self._permutations[epoch] = rng.permutation(self.n_examples).tolist()
        return self._permutations[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        positions = range(start, start + self.global_batch)
        return [self._permutation(p // self.n_examples)[p % self.n_examples] for p in positions]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n_examples

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
        """This rank's micro-batches of step s: the global batch is cut into world_size * accumulation
        contiguous micro-batches, dealt out rank-major so each rank gets `accumulation` of them."""
        indices = self.indices(step)
        per_rank = len(indices) // world_size
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
