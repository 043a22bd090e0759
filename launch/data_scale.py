"""How the data pipeline scales: N generated Alpaca rows (data/synthetic/prepare.py) loaded the way a
training run loads them, on the tiny base, with 1 and 2 ranks of this machine sharing one store:

    launch/train.py recipes/tiny_alpaca.yaml data.path=FILE --dry-run   (1 rank, then 2 under deepspeed)

each first with no store (tokenised in the run) and then with the store in place, where the 2-rank
run also takes its first training step. Prints one table: seconds until the data is ready (the
stats table printed), rows/s over that time, seconds until the run ends (the dry run) or its first
step is logged, and the peak private memory (RssAnon, sampled from /proc every 50 ms) of each rank;
the store's pages are file-backed and shared, so they are not in it. A 1,000-row run gives the
footprint of everything but the data.

    python launch/data_scale.py [--rows 100000 1000000] [--work DIR]

Every measurement uses a hard link of the generated file under a name of its own, so its store
is cold the first time whatever ran before (the cache key includes the file's path); the link and
its store are removed once measured.
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.runtime.cache import cache_dir
from trainer.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/tiny_alpaca.yaml"
STATS_LINE = re.compile(r"^[\d,]+ train / [\d,]+ held-out examples")
SAMPLE_SECONDS = 0.05


@dataclass
class Measurement:
    rows: int
    ranks: int
    store: str  # "built" (tokenised in the run) | "in place"
    data_ready: float | None = None  # seconds from start until the stats table is printed
    finished: float | None = None  # seconds until the dry run ends, or the first step is logged
    first_step: bool = False
    peak_anon: dict[int, int] = field(default_factory=dict)  # rank pid -> peak RssAnon bytes
    peak_file: int = 0  # largest RssFile seen in a rank (its share of the mapped store, among others)

    def row(self) -> list[str]:
        ranks = sorted(self.peak_anon.values())
        return [f"{self.rows:,}", str(self.ranks), self.store,
                f"{self.data_ready:.1f}" if self.data_ready else "-",
                # a tokenising rate: an in-place store reads no rows
                f"{self.rows / self.data_ready:,.0f}" if self.data_ready and self.store == "built" else "",
                (f"{self.finished:.1f}" if self.finished else "-") + (" (step 1)" if self.first_step else ""),
                " / ".join(f"{value / 2**20:,.0f}" for value in ranks) or "-", f"{self.peak_file / 2**20:,.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="dataset sizes")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "data_scale",
                        help="generated files, their links and the runs' output directories")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    link = fresh_link(data_file(1000, args.work), args.work, "footprint")
    results = [measure(link, 1000, 1, "built", args)]
    remove_stores(link)
    print(table(results), flush=True)
    for rows in args.rows:
        source = data_file(rows, args.work)
        for ranks in (1, 2):
            link = fresh_link(source, args.work, f"{rows}-{ranks}ranks")
            results.append(measure(link, rows, ranks, "built", args))
            results.append(measure(link, rows, ranks, "in place", args, first_step=ranks == 2))
            remove_stores(link)
            print(table(results[-2:]), flush=True)
    print(f"\nmachine: {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}")
    print(table(results))
    return 0


def data_file(rows: int, work: Path) -> Path:
    path = work / f"synthetic-{rows}.jsonl"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "data" / "synthetic" / "prepare.py"), "--rows", str(rows),
                        "--out", str(path)], check=True)
    return path


def fresh_link(source: Path, work: Path, name: str) -> Path:
    link = work / f"{name}-{time.time_ns()}.jsonl"
    os.link(source, link)
    return link


def remove_stores(data: Path) -> None:
    """The stores made from `data` (their info names the file they read) and the link itself:
    a store of 1M generated rows takes ~1.2 GB of the cache."""
    for info in (cache_dir() / "tokenized").glob("*/info.json"):
        if json.loads(info.read_text()).get("source", {}).get("path") == str(data):
            shutil.rmtree(info.parent)
    data.unlink()


def measure(data: Path, rows: int, ranks: int, store: str, args, first_step: bool = False) -> Measurement:
    output_dir = args.work / "runs" / f"{data.stem}-{store.replace(' ', '_')}"
    overrides = [f"data.path={data}", f"output_dir={output_dir}", "train.report=false", "train.sample_count=0"]
    overrides += ["train.max_steps=1", "train.eval_every=1000", "train.save_every=1000"] if first_step else ["--dry-run"]
    command = [sys.executable, "launch/train.py", RECIPE, *overrides]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                   str(free_port()), "launch/train.py", RECIPE, *overrides]
    result = Measurement(rows, ranks, store, first_step=first_step)
    metrics = output_dir / "metrics.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: list[tuple[float, str]] = []  # (seconds since start, line), filled by a reader thread
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - started, line)
                                                          for line in process.stdout), daemon=True)
    reader.start()
    while True:
        running = process.poll() is None
        elapsed = time.perf_counter() - started
        if result.data_ready is None:
            result.data_ready = next((at for at, line in list(lines) if STATS_LINE.match(line)), None)
        if first_step and result.finished is None and metrics.exists() and metrics.stat().st_size:
            result.finished = elapsed
        for pid in rank_pids(process.pid):
            anon, file_backed = memory(pid)
            result.peak_anon[pid] = max(result.peak_anon.get(pid, 0), anon)
            result.peak_file = max(result.peak_file, file_backed)
        if not running:
            break
        if elapsed > args.timeout:
            os.killpg(process.pid, 9)
            output = "".join(line for _, line in list(lines))
            raise SystemExit(f"{' '.join(command)} ran over {args.timeout:.0f} s\n{output[-4000:]}")
        time.sleep(SAMPLE_SECONDS)
    reader.join()
    output = "".join(line for _, line in lines)
    if result.data_ready is None:
        result.data_ready = next((at for at, line in lines if STATS_LINE.match(line)), None)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}\n{output[-4000:]}")
    if not first_step:
        result.finished = time.perf_counter() - started
    (output_dir / "data_scale.log").parent.mkdir(parents=True, exist_ok=True)
    (output_dir / "data_scale.log").write_text(output)
    return result


def rank_pids(root: int) -> list[int]:
    """The ranks under `root`: processes running launch/train.py themselves (not the deepspeed
    launchers that pass it on) and not forked from a rank (its tokenizer workers)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    ranks, stack = [], [(root, False)]
    while stack:
        pid, inside_rank = stack.pop()
        arguments = commands.get(pid, [])
        script = arguments.index("launch/train.py") if "launch/train.py" in arguments else None
        is_rank = (script is not None and not inside_rank
                   and not any("deepspeed" in argument for argument in arguments[:script]))
        if is_rank:
            ranks.append(pid)
        stack += [(child, inside_rank or is_rank) for child in children.get(pid, [])]
    return ranks


def memory(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process in bytes; zeros once it has gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                name, amount, _ = line.split()
                values[name] = int(amount) * 1024
    except OSError:
        pass
    return values.get("RssAnon:", 0), values.get("RssFile:", 0)


def table(results: list[Measurement]) -> str:
    header = ["rows", "ranks", "store", "data ready s", "rows/s", "end / first step s",
              "peak RssAnon per rank MB", "peak RssFile MB"]
    lines = [header, *(result.row() for result in results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


if __name__ == "__main__":
    raise SystemExit(main())
