"""Batches: examples -> padded tensors (`collate`), and the order examples are seen in (`BatchPlan`):
step s's examples are positions in the train set, which `Examples` (trainer/data/store.py) reads
from the memory-mapped store when the batch is made."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.formats import DataError


def token_tensor(ids) -> torch.Tensor:
    """An example's int32 token array as a tensor, sharing its memory (no element-wise copy)."""
    return torch.frombuffer(ids, dtype=torch.int32) if len(ids) else torch.zeros(0, dtype=torch.int32)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
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
        # Kept as arrays: a list of a million Python ints is ~36 MB, the int64 array 8 MB.
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, epoch])
            if len(self._permutations) > 2:  # a step spans at most two epochs
                self._permutations.clear()
            self._permutations[epoch] = rng.permutation(self.n_examples)
        return self._permutations[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        positions = range(start, start + self.global_batch)
        return [int(self._permutation(p // self.n_examples)[p % self.n_examples]) for p in positions]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n_examples

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
        """This rank's micro-batches of step s: the global batch is cut into world_size * accumulation
        contiguous micro-batches, dealt out rank-major so each rank gets `accumulation` of them."""
        indices = self.indices(step)
        per_rank = len(indices) // world_size
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
