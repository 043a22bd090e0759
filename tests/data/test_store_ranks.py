"""Two ranks of a node read one store, written once by the first; training from that store is
bitwise equal to training on the file tokenised in the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_cli

ROWS = 300
STEPS = ["train.max_steps=3", "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.eval_every=100", "train.save_every=100", "train.log_every=1", "train.sample_count=0",
         "data.max_eval_rows=8"]


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and {i % 17}.", "input": "",
                                        "output": f"{i} + {i % 17} = {i + i % 17}"}) + "\n" for i in range(ROWS)))
    return path


def two_ranks(out: Path, overrides: list[str]) -> list[dict]:
    """Both ranks started as a launcher starts them (one node, gloo), each writing what it read."""
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "tests/data/rank_reads_store.py", str(out), *overrides],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in ranks:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"rank exited {process.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in map(json.loads, (output_dir / "metrics.jsonl").open())}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_map_one_store_and_training_from_it_equals_training_from_the_file(tmp_path, tiny_base):
    data = write_rows(tmp_path / "rows.jsonl")
    overrides = [f"data.path={data}", *STEPS]
    first, second = two_ranks(tmp_path, overrides)
    assert first["store"] == second["store"] and first["inode"] == second["inode"]
    assert (first["cache"], second["cache"]) == ("miss", "hit"), "rank 0 wrote the store, rank 1 read it"
    assert first["mapped"] and second["mapped"], "the tokens are read through a memory map"
    assert first["first_step"] == second["first_step"] and first["trained_tokens"] == second["trained_tokens"]
    store = Path(first["store"])
    assert not [p for p in store.parent.iterdir() if p.name.startswith(f".{store.name}")], "no temporary left"

    # One rank, the store in place (cache hit), against one that tokenises the file in the run.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    from_store = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path / 'store'}",
                          *overrides], env=env)
    from_file = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path / 'file'}",
                         *overrides, "data.cache=false"], env=env)
    assert "cache hit" in from_store.stdout and "cache off" in from_file.stdout
    assert os.stat(store / "input_ids.npy").st_ino == first["inode"], "the store was written once"
    assert losses(tmp_path / "store") == losses(tmp_path / "file")  # bitwise: exact float equality
    assert len(losses(tmp_path / "file")) == 3
