"""Ours against transformers Trainer + peft on the same QLoRA job, side by side.

    python launch/bench.py [--steps 20] [--warmup 3] [--repeats 1] [--threads N] [--activation-checkpointing]

Each framework trains in its own process (peak memory is per process), one after the other,
`--repeats` times alternating. Ours runs through the real CLI (`launch/train.py`) and is timed
from its metrics.jsonl; theirs is `launch.benchmarks.hf_trainer`. Both see the same examples in the same
order and are timed the same way, from the wall clock at the end of every optimizer step; the
warmup steps are left out. Prints a markdown table; writes runs/bench/{results.json,table.md}.

Throughput is given twice: over the whole timed window, and from the median step time. On a
machine shared with other work, a burst of load stalls a few steps (with several threads, one
descheduled thread stalls them all); the median step is the number that survives it.
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launch.benchmarks import job as bench_job
from trainer.speedups import malloc
from launch.benchmarks.job import ROOT, Job

FRAMEWORKS = ("ours", "theirs")
TITLES = {"ours": "ours", "theirs": "HF Trainer + peft"}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps run first")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--data", default=None, help="data.path (default: GSM8K if present, else builtin:tasks)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per framework, alternating; medians reported")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="on for both frameworks")
    parser.add_argument("--no-packing", action="store_true", help="ours without data.packing")
    parser.add_argument("--same-allocator", action="store_true",
                        help="theirs also runs with the glibc malloc tunables ours' launch/train.py sets")
    parser.add_argument("--out", default="runs/bench")
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    gpu = torch.cuda.is_available()
    device = (torch.cuda.get_device_name(0) if gpu
              else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads per process)")
    # MFU against the rate this device multiplies bf16 matrices at today, measured before either run.
    peak = bench_job.measured_bf16_matmul_flops() if gpu else None
    if peak:
        print(f"[bench] measured dense bf16 matmul peak: {peak / 1e12:,.0f} TFLOP/s", flush=True)
    job = Job(base=bench_job.ensure_bench_base(gpu), data=args.data or bench_job.default_data(),
              max_seq_len=args.max_seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch,
              warmup_steps=args.warmup, timed_steps=args.steps, activation_checkpointing=args.activation_checkpointing,
              lora_dropout=args.lora_dropout)
    out = ROOT / args.out
    tokens = bench_job.step_tokens(job)
    packing, packing_overrides = ours_packing(not args.no_packing)
    ours_overrides = [*job.overrides(), *packing_overrides]

    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for repeat in range(args.repeats):
        for name in FRAMEWORKS:
            print(f"[bench] {TITLES[name]}, run {repeat + 1}/{args.repeats} ...", flush=True)
            scratch = out / f"{name}-{repeat}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            run = (run_ours(job, ours_overrides, scratch) if name == "ours"
                   else run_theirs(job, scratch, tuned_malloc=args.same_allocator))
            runs[name].append(summarise(run, tokens, job))
            print(f"[bench]   {runs[name][-1]['tokens_per_s_median_step']:,.0f} useful tokens/s (median step), "
                  f"peak RSS {runs[name][-1]['peak_rss_mib']:,.0f} MiB", flush=True)

    table = markdown_table(job, runs, tokens, device, packing, gpu, args.same_allocator, peak)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"job": vars(job), "device": device, "packing": packing,
                                                  "measured_bf16_matmul_flops": peak,
                                                  "same_allocator": args.same_allocator, "runs": runs}, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")


def ours_packing(wanted: bool) -> tuple[str, list[str]]:
    """Whether ours will pack (for the table), and the override that asks for it."""
    import inspect

    from trainer import loop
    from trainer.config import DataConfig

    if "training_collate" not in inspect.getsource(loop):
        return "off (this checkout's loop does not pack)", []
    if "packing" not in DataConfig.__dataclass_fields__:
        if not wanted:
            raise SystemExit("--no-packing: this checkout has no data.packing to turn packing off with")
        return "on", []
    return ("on", ["data.packing=true"]) if wanted else ("off (--no-packing)", ["data.packing=false"])


def run_ours(job: Job, overrides: list[str], scratch: Path) -> dict:
    output_dir = scratch / "run"
    # Under the memory probe, launch/train.py runs inside the probe's process and does not re-execute
    # itself; the probe gets the allocator settings it would have applied (trainer/malloc.py).
    wall = run_child(["launch/train.py", str(bench_job.RECIPE), *overrides, f"output_dir={output_dir}"], scratch,
                     tuned_malloc=True)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r]
    if [r["step"] for r in records] != list(range(1, job.total_steps + 1)):
        raise RuntimeError(f"{output_dir}/metrics.jsonl: expected steps 1..{job.total_steps}, "
                           f"got {[r['step'] for r in records]}")
    # The wall clock at the end of each step, as for theirs; summed step_time if a log lacks it.
    if all("time" in r for r in records):
        ends = [r["time"] for r in records]
    else:
        ends = [sum(r["step_time"] for r in records[:i + 1]) for i in range(len(records))]
    return {"step_ends": ends, "wall_s": wall, **json.loads((scratch / "memory.json").read_text())}


def run_theirs(job: Job, scratch: Path, tuned_malloc: bool) -> dict:
    times = scratch / "step_ends.json"
    wall = run_child(["-m", "launch.benchmarks.hf_trainer", str(bench_job.RECIPE), *job.overrides(), "--times", str(times)],
                     scratch, tuned_malloc)
    ends = json.loads(times.read_text())
    if len(ends) != job.total_steps:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {job.total_steps}")
    return {"step_ends": ends, "wall_s": wall, **json.loads((scratch / "memory.json").read_text())}


def run_child(command: list[str], scratch: Path, tuned_malloc: bool) -> float:
    """Run `python COMMAND` under the memory probe, output to scratch/log.txt; returns wall seconds."""
    from trainer.speedups import onednn  # here, not on top: it imports torch, which must see --threads first

    # Not the oneDNN cache caps that importing our trainer (for ours_packing) put in this environment:
    # ours sets them again itself, theirs runs as it would on its own.
    env = {**{k: v for k, v in os.environ.items() if k not in onednn.SET_ON_IMPORT},
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # One GPU each: on a multi-GPU machine HF Trainer would wrap the model in DataParallel over all
    # of them (a batch of micro x GPUs), while ours runs one rank.
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    tunables = malloc.tunables_for(env) if tuned_malloc else None
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    log = scratch / "log.txt"
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "launch.benchmarks.probe", str(scratch / "memory.json"), *command],
                                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}; {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def summarise(run: dict, tokens: list[dict], job: Job) -> dict:
    ends = run["step_ends"]
    step_times = [b - a for a, b in zip(ends[job.warmup_steps - 1:], ends[job.warmup_steps:])]
    useful_per_step = sum(t["useful"] for t in tokens[job.warmup_steps:]) / job.timed_steps
    median_step = statistics.median(step_times)
    summary = {"tokens_per_s": useful_per_step * job.timed_steps / sum(step_times),
               "tokens_per_s_median_step": useful_per_step / median_step,
               "step_time_median_s": median_step, "step_times_s": step_times,
               "peak_rss_mib": run["peak_rss_bytes"] / 2 ** 20, "wall_s": run["wall_s"]}
    if "peak_gpu_allocated_bytes" in run:
        summary["peak_gpu_mib"] = run["peak_gpu_allocated_bytes"] / 2 ** 20
    return summary


def markdown_table(job: Job, runs: dict[str, list[dict]], tokens: list[dict], device: str, packing: str,
                   gpu: bool, same_allocator: bool, peak: float | None = None) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    rows = [("useful (non-pad) tokens/s, median step", "tokens_per_s_median_step", "{:,.0f}"),
            ("useful (non-pad) tokens/s, whole timed window", "tokens_per_s", "{:,.0f}"),
            ("step time, median (s)", "step_time_median_s", "{:.3f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}")]
    if gpu:
        rows.append(("peak GPU memory allocated (MiB)", "peak_gpu_mib", "{:,.0f}"))
    rows.append(("process wall time: start-up, steps, final save (s)", "wall_s", "{:.0f}"))
    timed = tokens[job.warmup_steps:]
    lines = [
        f"Job: `{Path(job.base).name}` base, NF4 double-quant, LoRA r=16 alpha=32 dropout={job.lora_dropout} "
        f"on q,k,v,o; "
        f"data `{Path(job.data).name}`, max length {job.max_seq_len}, global batch {job.global_batch} "
        f"(micro {job.micro_batch}), {job.timed_steps} timed steps after {job.warmup_steps} warmup, "
        f"{sum(t['useful'] for t in timed) / len(timed):,.0f} useful tokens per step. "
        f"Activation checkpointing {'on' if job.activation_checkpointing else 'off'} (both); ours' packing {packing}; "
        f"glibc malloc tunables (trainer/malloc.py) for {'both' if same_allocator else 'ours only'}. "
        f"Device: {device}; median of {len(runs['ours'])} run(s) each.",
        "",
        f"| metric | {TITLES['ours']} | {TITLES['theirs']} | ours / theirs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for title, key, fmt in rows:
        ours, theirs = median("ours", key), median("theirs", key)
        lines.append(f"| {title} | {fmt.format(ours)} | {fmt.format(theirs)} | {ours / theirs:.2f}x |")
    if peak:
        flops = bench_job.flops_per_token(job.base, sum(t["squared"] for t in timed), sum(t["useful"] for t in timed))
        mfu = {name: median(name, "tokens_per_s_median_step") * flops / peak for name in FRAMEWORKS}
        lines.append(f"| MFU (4N + attention FLOPs per token; bf16 matmul peak measured: {peak / 1e12:,.0f} TFLOP/s) | {mfu['ours']:.1%} "
                     f"| {mfu['theirs']:.1%} | {mfu['ours'] / mfu['theirs']:.2f}x |")
    if len(runs["ours"]) > 1:
        # Runs alternate ours, theirs, ours, ...: a pair shares the machine's state at the time, so the
        # ratio within each pair is less exposed to a slow spell than the ratio of the medians.
        pairs = [ours["tokens_per_s_median_step"] / theirs["tokens_per_s_median_step"]
                 for ours, theirs in zip(runs["ours"], runs["theirs"])]
        memory = [ours["peak_rss_mib"] / theirs["peak_rss_mib"] for ours, theirs in zip(runs["ours"], runs["theirs"])]
        lines += ["", f"Per run pair, ours / theirs: tokens/s (median step) {', '.join(f'{r:.2f}x' for r in pairs)} "
                      f"(median {statistics.median(pairs):.2f}x); peak RSS {', '.join(f'{r:.2f}x' for r in memory)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
