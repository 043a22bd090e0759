"""Ours against transformers Trainer + peft on the same QLoRA job, side by side.

    python launch/bench.py [--job tiny|smollm2] [--base DIR|FILE.gguf|builtin:NAME] [--threads N]
        [--ranks 1|2] [--steps 20] [--warmup 3] [--repeats 1] [--profile] [--activation-checkpointing]
        [--quant-compute-dtype auto|bfloat16]
    make bench BENCH_ARGS="--job smollm2"

Jobs (`--job`; a flag given as well overrides the job's value). Both: NF4 double quant, LoRA r=16
alpha=32 on q, k, v, o, the alpaca template, GSM8K (launch/benchmarks/job.py).
  tiny     (default) the built-in tiny Llama (on a GPU a 1B-class random Llama); max length 512,
           global batch 16 (micro 8), LoRA dropout 0.05, 3 warmup + 20 timed steps, torch's threads.
  smollm2  the real base, SmolLM2-135M (builtin:smollm2-135m, from its GGUF file); max length 256,
           batch 8 (micro 8), LoRA dropout 0, 2 warmup + 8 timed steps, one thread.

Each framework trains in its own process (peak memory is per process), one after the other,
`--repeats` times alternating (ours first in even repeats, theirs first in odd ones). Ours runs
through the real CLI (`launch/train.py`) and is timed from its metrics.jsonl; theirs is
`launch.benchmarks.hf_trainer`. Both see the same examples in the same order and are timed the same
way, from the wall clock at the end of every optimizer step; the warmup steps are left out.
`--threads` is what the job may use in all: with `--ranks 2` ours runs two ranks of threads/2
through the deepspeed launcher (as launch/train.py is normally run), and theirs stays one process
with every thread (the table says so).

Beside throughput and peak memory:
- utilisation: the median over the timed steps of a step's useful FLOPs (`useful_flops` in
  launch/benchmarks/job.py) / its time, over the matrix-multiply peak measured on this device before and after the runs, the higher
  of the two (CPU: one thread's best fp32 rate x threads; GPU: dense bf16). With
  `--quant-compute-dtype bfloat16` on CPU (both frameworks compute the frozen 4-bit layers' products
  in bf16, the rest in fp32) the bf16 rate is measured too, and the peak is the rate of this step's
  mix of products at the two rates (`matmul_peak` in launch/benchmarks/peak.py);
- quality: the held-out loss each reaches after the last step, on the same held-out rows
  (summed token losses / tokens), so a speed-up never hides a different computation.
`--profile` then runs a few of our steps under torch.profiler (launch/benchmarks/profile.py) and
prints where the time goes. Prints markdown; writes runs/bench/{results.json,table.md}.

Throughput is given twice: over the whole timed window, and as the median of the steps' own rates. On a
machine shared with other work, a burst of load stalls a few steps (with several threads, one
descheduled thread stalls them all); the median step is the number that survives it.
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch.benchmarks import job as bench_job
from launch.benchmarks import peak as bench_peak
from trainer.speedups import malloc
from launch.benchmarks.job import RECIPE, ROOT, Job
from launch.benchmarks.results import TITLES, higher_peak, markdown_table, mean_parts, step_ends, summarise

FRAMEWORKS = ("ours", "theirs")
# The flags a job sets, at the tiny job's values; a job names only what it changes.
DEFAULTS = {"base": None, "steps": 20, "warmup": 3, "global_batch": 16, "micro_batch": 8, "max_seq_len": 512,
            "lora_dropout": 0.05, "threads": None}
JOBS = {
    "tiny": {},
    "smollm2": {"base": "builtin:smollm2-135m", "max_seq_len": 256, "global_batch": 8, "micro_batch": 8,
                "lora_dropout": 0.0, "warmup": 2, "steps": 8, "threads": 1},
}
PROFILED_STEPS = 3  # at most; after the job's warmup steps


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=sorted(JOBS), default="tiny", help="the standard job to run")
    parser.add_argument("--base", help="model.name_or_path: a directory, a .gguf file or builtin:<name>")
    parser.add_argument("--steps", type=int, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, help="untimed steps run first")
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--lora-dropout", type=float)
    parser.add_argument("--threads", type=int, help="torch threads for the job in all (default: torch's)")
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=1, help="ours' processes (theirs: 1)")
    parser.add_argument("--data", default=None, help="data.path (default: GSM8K if present, else builtin:tasks)")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows both score at the end (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per framework, alternating; medians reported")
    parser.add_argument("--profile", action="store_true", help="then profile ours: where its step's time goes")
    parser.add_argument("--activation-checkpointing", action="store_true", help="on for both frameworks")
    parser.add_argument("--quant-compute-dtype", choices=("auto", "bfloat16"), default="auto",
                        help="quant.compute_dtype for both frameworks: bfloat16 = the frozen 4-bit layers' products "
                             "in bf16 (AMX on a CPU that has it), the rest in the model's dtype")
    parser.add_argument("--no-packing", action="store_true", help="ours without data.packing")
    parser.add_argument("--same-allocator", action="store_true",
                        help="theirs also runs with the glibc malloc tunables ours' launch/train.py sets")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, JOBS[args.job].get(key, default))
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.threads is not None and args.threads < args.ranks:
        parser.error(f"--threads {args.threads} cannot be shared by {args.ranks} ranks")
    return args


def main() -> None:
    args = parse()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    threads = args.threads or torch.get_num_threads()
    if threads < args.ranks:
        raise SystemExit(f"{threads} torch thread(s) cannot be shared by {args.ranks} ranks: give --threads")
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    job = job_from(args, gpu)
    out = ROOT / args.out
    tokens = bench_job.step_tokens(job)
    per_step = bench_job.step_flops(job, tokens[job.warmup_steps:])
    step_flops, flops = [sum(step.values()) for step in per_step], mean_parts(per_step)
    frozen_dtype = "float32" if job.quant_compute_dtype == "auto" else job.quant_compute_dtype
    # Measured before either run, on a machine as quiet as the runs will find it.
    peak = bench_peak.matmul_peak(gpu, threads, flops, frozen_dtype)
    print(f"[bench] matrix-multiply peak: {peak['text']}", flush=True)
    packing, packing_overrides = ours_packing(not args.no_packing)
    ours_overrides = [*job.overrides(), *packing_overrides]
    layout = {"ours": (args.ranks, threads // args.ranks), "theirs": (1, threads)}  # (processes, threads each)

    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for repeat in range(args.repeats):
        # Ours first in even repeats, theirs first in odd ones: the machine's drift falls on both sides.
        for name in FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]:
            print(f"[bench] {TITLES[name]}, run {repeat + 1}/{args.repeats} ...", flush=True)
            scratch = fresh(out / f"{name}-{repeat}")
            run = (run_ours(job, ours_overrides, scratch, *layout["ours"]) if name == "ours"
                   else run_theirs(job, scratch, args.same_allocator, threads))
            runs[name].append(summarise(run, tokens, job, step_flops, peak["flops"]))
            print(f"[bench]   {runs[name][-1]['tokens_per_s_median_step']:,.0f} useful tokens/s (median step), "
                  f"peak RSS {runs[name][-1]['peak_rss_mib']:,.0f} MiB", flush=True)
    after = bench_peak.matmul_peak(gpu, threads, flops, frozen_dtype)
    print(f"[bench] matrix-multiply peak, again after the runs: {after['text']}", flush=True)
    peak = higher_peak(peak, after, runs)

    table = markdown_table(job, runs, tokens, device, packing, gpu, args.same_allocator, peak, flops, layout)
    profile = None
    if args.profile:
        print("[bench] profiling ours ...", flush=True)
        profile = run_profile(job, ours_overrides, fresh(out / "profile"), *layout["ours"])
        from launch.benchmarks.profile import table as profile_table

        table += "\n\nWhere our step's time goes (`--profile`, launch/benchmarks/profile.py):\n\n" + profile_table(profile)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps(
        {"job": vars(job), "device": device, "packing": packing, "layout": layout, "matmul_peak": peak,
         "measured_bf16_matmul_flops": peak["flops"] if gpu else None, "useful_flops_per_step": flops,
         "same_allocator": args.same_allocator, "runs": runs, "profile": profile}, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")


def job_from(args: argparse.Namespace, gpu: bool) -> Job:
    return Job(base=args.base or bench_job.ensure_bench_base(gpu), data=args.data or bench_job.default_data(),
               max_seq_len=args.max_seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch,
               warmup_steps=args.warmup, timed_steps=args.steps, activation_checkpointing=args.activation_checkpointing,
               lora_dropout=args.lora_dropout, eval_rows=args.eval_rows, quant_compute_dtype=args.quant_compute_dtype)


def fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def ours_packing(wanted: bool) -> tuple[str, list[str]]:
    """Whether ours will pack (for the table), and the override that asks for it."""
    import inspect

    from trainer.config import DataConfig

    try:
        from trainer import setup as builds_the_run  # picks the run's collate
    except ImportError:  # a checkout from before trainer/setup.py, whose loop.py built the run
        from trainer import loop as builds_the_run
    if "training_collate" not in inspect.getsource(builds_the_run):
        return "off (this checkout's loop does not pack)", []
    if "packing" not in DataConfig.__dataclass_fields__:
        if not wanted:
            raise SystemExit("--no-packing: this checkout has no data.packing to turn packing off with")
        return "on", []
    return ("on", ["data.packing=true"]) if wanted else ("off (--no-packing)", ["data.packing=false"])


def run_ours(job: Job, overrides: list[str], scratch: Path, ranks: int = 1, threads: int | None = None) -> dict:
    output_dir = scratch / "run"
    # Under the memory probe, launch/train.py runs inside the probe's process and does not re-execute
    # itself; the probe gets the allocator settings it would have applied (trainer/speedups/malloc.py).
    wall = run_child(["launch/train.py", str(RECIPE), *overrides, f"output_dir={output_dir}"], scratch,
                     tuned_malloc=True, ranks=ranks, threads=threads)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r]
    if [r["step"] for r in records] != list(range(1, job.total_steps + 1)):
        raise RuntimeError(f"{output_dir}/metrics.jsonl: expected steps 1..{job.total_steps}, "
                           f"got {[r['step'] for r in records]}")
    return {"step_ends": step_ends(records), "wall_s": wall, "eval_loss": records[-1].get("eval_loss"),
            **peak_memory(scratch)}


def run_theirs(job: Job, scratch: Path, tuned_malloc: bool, threads: int | None = None) -> dict:
    times, held_out = scratch / "step_ends.json", scratch / "held_out.json"
    scoring = ["--held-out", str(held_out), "--final-only"] if job.eval_rows else []
    wall = run_child(["-m", "launch.benchmarks.hf_trainer", str(RECIPE), *job.overrides(), "--times", str(times),
                      *scoring], scratch, tuned_malloc, threads=threads)
    ends = json.loads(times.read_text())
    if len(ends) != job.total_steps:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {job.total_steps}")
    eval_loss = None
    if job.eval_rows:
        eval_loss = json.loads(held_out.read_text())["held_out"][str(job.total_steps)]["eval_loss"]
    return {"step_ends": ends, "wall_s": wall, "eval_loss": eval_loss, **peak_memory(scratch)}


def run_profile(job: Job, overrides: list[str], scratch: Path, ranks: int, threads: int) -> dict:
    result = scratch / "profile.json"
    run_child(["-m", "launch.benchmarks.profile", str(RECIPE), *overrides, f"output_dir={scratch / 'run'}",
               "--warmup", str(job.warmup_steps), "--steps", str(min(job.timed_steps, PROFILED_STEPS)),
               "--out", str(result)], scratch, tuned_malloc=True, ranks=ranks, threads=threads)
    return json.loads(result.read_text())


def peak_memory(scratch: Path) -> dict:
    """The probes' records (one per process): peak RSS summed over the processes and of the largest."""
    records = [json.loads(path.read_text()) for path in sorted(scratch.glob("memory*.json"))]
    memory = {"peak_rss_bytes": sum(r["peak_rss_bytes"] for r in records),
              "peak_rss_largest_bytes": max(r["peak_rss_bytes"] for r in records), "processes": len(records)}
    if any("peak_gpu_allocated_bytes" in r for r in records):
        memory["peak_gpu_allocated_bytes"] = max(r.get("peak_gpu_allocated_bytes", 0) for r in records)
    return memory


def run_child(command: list[str], scratch: Path, tuned_malloc: bool, ranks: int = 1,
              threads: int | None = None) -> float:
    """Run `python COMMAND` under the memory probe (with ranks > 1, that many of it through the
    deepspeed launcher), with `threads` torch threads per process; output to scratch/log.txt, each
    process's peak memory to scratch/memory*.json. Returns wall seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # One GPU per rank: on a multi-GPU machine HF Trainer would wrap the model in DataParallel over
    # all of them (a batch of micro x GPUs), while it runs one process.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(ranks))))
                                           .split(",")[:ranks])
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    # As launch/train.py would have applied them: not where a GPU is visible.
    tunables = malloc.tunables_for(env) if tuned_malloc and not malloc.gpu_visible(env) else None
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    if ranks == 1:
        launcher, memory = [sys.executable, "-m", "launch.benchmarks.probe"], "memory.json"
    else:  # the probe started once per rank, as the launcher starts launch/train.py
        from trainer.runtime.distributed import free_port  # here: it imports torch, which must see --threads first

        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                    str(free_port()), "--no_local_rank", "--module", "launch.benchmarks.probe"]
        memory = "memory-{rank}.json"
    log = scratch / "log.txt"
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([*launcher, str(scratch / memory), *command], cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}; {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
