"""Instruction data: rows -> prompt template -> token ids with labels masked on the prompt.

A row is `{"instruction", "input", "output"}` (Alpaca). Examples keep the row id they came from,
so a bad batch can be traced back to the rows in it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import builtin
from trainer.config import DataConfig

IGNORE_INDEX = -100

TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file, the row and the problem."""


@dataclass
class Example:
    row_id: int
    input_ids: list[int]
    labels: list[int]


# ------------------------------------------------------------------------------ reading


def read_rows(path: str, split: str = "train", max_rows: int | None = None) -> list[dict[str, str]]:
    """Rows from a local .json/.jsonl file, a `builtin:` set, or a hub dataset through `datasets`."""
    path = builtin.resolve(path)
    local = Path(path)
    if local.suffix in (".json", ".jsonl") or local.exists():
        raw = _read_local(local)
        source = str(local)
    else:
        raw = _read_hub(path, split)
        source = f"{path} (split {split})"
    if max_rows is not None:
        raw = raw[:max_rows]
    return [_validate_row(row, source, number) for number, row in enumerate(raw, start=1)]


def _read_local(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path should be a .json/.jsonl file or a hub id)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON at line {error.lineno} ({error.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _read_hub(name: str, split: str) -> list[Any]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for "not found / offline"
        raise DataError(f"could not load dataset {name!r} (split {split}) from a local path or the hub: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. "
                        f"Point data.path at a local .json/.jsonl file.") from None
    return list(dataset)


def _validate_row(row: Any, source: str, number: int) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{source}: row {number}: expected an object, got {type(row).__name__}")
    clean = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = row.get(key, None if required else "")
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            problem = "is missing" if value is None else f"is {type(value).__name__}, not a string"
            raise DataError(f"{source}: row {number}: field {key!r} {problem} (row keys: {sorted(row)})")
        if required and not value.strip():
            raise DataError(f"{source}: row {number}: field {key!r} is empty")
        clean[key] = value
    return clean


# ------------------------------------------------------------------------------ tokenising


def render_prompt(row: dict[str, str], template: str) -> str:
    with_input, without_input = TEMPLATES[template]
    if row["input"].strip():
        return with_input.format(instruction=row["instruction"], input=row["input"])
    return without_input.format(instruction=row["instruction"])


def tokenize_row(tokenizer, row: dict[str, str], row_id: int, config: DataConfig) -> Example | None:
    """BOS + prompt + response + EOS. Prompt and response are tokenised apart so the mask boundary
    is exact. Too long: the prompt is cut from its start, keeping the response. Returns None when
    no response token would survive (never train silently on a prompt-only row)."""
    prompt = tokenizer(render_prompt(row, config.template), add_special_tokens=False)["input_ids"]
    response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room_for_prompt = config.max_seq_len - len(bos) - len(response)
    if room_for_prompt < 0:
        return None
    prompt = prompt[len(prompt) - room_for_prompt:] if len(prompt) > room_for_prompt else prompt
    input_ids = bos + prompt + response
    prompt_labels = bos + prompt if config.train_on_prompt else [IGNORE_INDEX] * (len(bos) + len(prompt))
    return Example(row_id, input_ids, prompt_labels + response)


def tokenize_rows(tokenizer, rows: list[dict[str, str]], config: DataConfig,
                  row_ids: list[int] | None = None) -> tuple[list[Example], int]:
    """Returns the examples and the number of rows dropped because their response does not fit.
    `row_ids` are the rows' positions in their source file (0-based), kept for error messages."""
    row_ids = row_ids if row_ids is not None else list(range(len(rows)))
    examples = [tokenize_row(tokenizer, row, row_id, config) for row_id, row in zip(row_ids, rows)]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def build_datasets(config: DataConfig, tokenizer, seed: int) -> tuple[list[Example], list[Example], dict]:
    """Train and held-out examples, and counts for the preflight summary."""
    rows = read_rows(config.path, config.split, config.max_rows)
    if config.eval_path:
        eval_rows = read_rows(config.eval_path, config.split)
        train_ids, eval_ids = list(range(len(rows))), list(range(len(eval_rows)))
        train_rows = rows
    else:
        train_ids, eval_ids = split_rows(rows, config.eval_fraction, seed)
        train_rows, eval_rows = [rows[i] for i in train_ids], [rows[i] for i in eval_ids]
    eval_rows, eval_ids = eval_rows[:config.max_eval_rows], eval_ids[:config.max_eval_rows]
    train, dropped_train = tokenize_rows(tokenizer, train_rows, config, train_ids)
    held_out, dropped_eval = tokenize_rows(tokenizer, eval_rows, config, eval_ids)
    stats = {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "train_examples": len(train),
             "eval_examples": len(held_out), "dropped_too_long": dropped_train + dropped_eval}
    return train, held_out, stats


def split_rows(rows: list[dict[str, str]], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of row ids."""
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    n_eval = int(round(len(rows) * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
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
            raise DataError("no training examples left after splitting and length filtering")
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
