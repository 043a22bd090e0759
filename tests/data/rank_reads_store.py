"""One rank for tests/data/test_store_ranks.py: prepares the data as training does (`setup.prepare_data`
after `distributed.init`) and writes what it read to <out>/rank<r>.json: the store's path and inode,
whether this process maps it, the cache outcome, and the examples of the first step.

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 ... python tests/data/rank_reads_store.py OUT [section.key=value ...]
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.recipe_loading import load_recipe  # noqa: E402
from trainer.runtime import distributed  # noqa: E402
from trainer.setup import prepare_data, prepare_tokenizer  # noqa: E402


def main(out: Path, overrides: list[str]) -> None:
    distributed.init()
    recipe = load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", overrides)
    _, tokenizer = prepare_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    store = data.train_set.parts[0].store
    tokens = store.path / "input_ids.npy"
    first_step = [data.train_set[i] for i in data.plan.indices(0)]
    report = {"store": str(store.path), "inode": tokens.stat().st_ino, "cache": data.stats["cache"],
              "mapped": str(tokens) in Path("/proc/self/maps").read_text(),
              "first_step": [[e.row_id, list(e.input_ids), list(e.labels)] for e in first_step],
              "trained_tokens": int(data.token_counts.sum()), "train_examples": len(data.train_set)}
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    distributed.finish(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
