"""What each adapter variant buys, measured: LoRA, rsLoRA, DoRA and LoRA+ trained one after another
on the same recipe (same data, steps, rank and targets), each then scored by launch/eval.py on the
same held-out rows. Prints one table: trainable parameters, held-out loss, exact match,
final-number accuracy and the median step time.

    python launch/variants.py                         (recipes/smollm2_tasks.yaml, 40 steps, 64 held-out rows)
    python launch/variants.py [RECIPE.yaml] [section.key=value ...] [--ranks N] [--only lora,dora]

Every run writes under <output_dir>/<name>/ (metrics.jsonl, checkpoints, eval/); its training and
evaluation output shows as it runs, and is kept in train.log and eval.log there. A rerun first moves an
earlier run's files there, logs included, into earlier-runs/<time>/ (with resume=..., it appends to the logs).
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from trainer.config import RecipeError
from trainer.recipe_loading import load_recipe
from trainer.runtime.distributed import free_port
from trainer.runtime.run_dir import lock, set_aside_earlier_run, unlock

DEFAULT_RECIPE = "recipes/smollm2_tasks.yaml"
DEFAULTS = ["train.max_steps=40", "train.eval_every=40", "train.save_every=40", "data.max_eval_rows=64",
            "train.sample_count=0", "train.report=false", "train.log_every=1"]
VARIANTS = {  # name -> overrides on top of the recipe's plain LoRA
    "lora": [],
    "rslora": ["lora.rslora=true"],
    "dora": ["lora.dora=true"],
    "lora+": ["lora.plus_ratio=16"],
}
EVAL_OPTIONS = ["eval.max_new_tokens=32"]  # the built-in tasks' answers are under 12 characters
LOGS = ("train.log", "eval.log")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arguments", nargs="*", metavar="[RECIPE.yaml] [section.key=value ...]")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks each run trains on (default 2; 1: no launcher)")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help=f"comma-separated variants to run (default all: {','.join(VARIANTS)})")
    args = parser.parse_intermixed_args(argv)
    if unknown := [name for name in args.only.split(",") if name not in VARIANTS]:
        parser.error(f"--only {','.join(unknown)}: not a variant; the variants are {', '.join(VARIANTS)}")
    # As launch/demo.py: the first argument is the recipe only if it names a YAML file (lora.r=8 is an override).
    given = args.arguments
    args.recipe = given[0] if given and given[0].endswith((".yaml", ".yml")) else DEFAULT_RECIPE
    overrides = [*DEFAULTS, *(given[1:] if given and given[0] == args.recipe else given)]
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as error:  # one line, as the launch scripts report a bad recipe (trainer/cli.py)
        print(f"error: {error}", file=sys.stderr)
        return 2
    base_dir = Path(recipe.output_dir)
    resuming = recipe.resume is not None  # from the recipe file or an override
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    results = {}
    overrides = [item for item in overrides if not item.startswith("output_dir=")]  # read into base_dir above
    for name in args.only.split(","):
        run_dir = base_dir / name
        run_overrides = [*overrides, *VARIANTS[name], f"output_dir={run_dir}"]
        launcher = ([str(bin_dir / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(free_port())]
                    if args.ranks > 1 else [sys.executable])
        train = [*launcher, "launch/train.py", args.recipe, *run_overrides]
        # train.py would set an earlier run aside itself, but not the logs this script writes before it starts.
        # Under the run's lock, as train.py does it: never the files of a run still writing there.
        if not resuming:
            try:
                lock(run_dir)
                earlier = set_aside_earlier_run(run_dir, also=LOGS)
            except RecipeError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            finally:
                unlock(run_dir)
            if earlier is not None:
                print(f"{name}: an earlier run's files in {run_dir} moved to {earlier}", flush=True)
        print("$ " + ("deepspeed " if args.ranks > 1 else "python ") + " ".join(train[1:]), flush=True)
        code, train_output = shown_and_logged(train, env, run_dir / "train.log", append=resuming)
        if code != 0:
            print(f"error: training {name} failed (exit {code}); its output is in {run_dir / 'train.log'}",
                  file=sys.stderr)
            return code
        checkpoint = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        evaluation = [sys.executable, "launch/eval.py", args.recipe, *run_overrides, f"adapter={checkpoint}",
                      f"out={run_dir / 'eval'}", *EVAL_OPTIONS]
        print("$ python " + " ".join(evaluation[1:]), flush=True)
        code, _ = shown_and_logged(evaluation, env, run_dir / "eval.log", append=resuming)
        if code != 0:
            print(f"error: evaluating {name} failed (exit {code}); its output is in {run_dir / 'eval.log'}",
                  file=sys.stderr)
            return code
        results[name] = summary(run_dir, train_output)
        print(json.dumps({name: results[name]}), flush=True)
    print(table(results))
    return 0


def shown_and_logged(command: list[str], env: dict[str, str], log: Path, append: bool = False) -> tuple[int, str]:
    """Run `command`, its output (stderr too: progress bars) shown as it comes and written to `log`
    (after what it holds, with `append`); returns the exit code and this run's output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    written = bytearray()
    with open(log, "ab" if append else "wb") as kept:
        # unbuffered: the child's log lines arrive as written, in order with its progress bars
        process = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)

        def drain() -> None:
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                kept.write(chunk)
                written.extend(chunk)

        try:
            drain()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: it saves at its next step; see it through
            drain()
            process.wait()
            raise
        code = process.wait()
    return code, written.decode(errors="replace")


def summary(run_dir: Path, train_output: str) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = json.loads((run_dir / "eval" / "metrics.json").read_text())
    found = re.search(r"trainable parameters: ([\d,]+)", train_output)
    trainable = found.group(1) if found else "?"
    step_times = [r["step_time"] for r in records if "step_time" in r and r["step"] > 1]
    return {"trainable": trainable, "eval_loss": scores.get("eval_loss"), "exact_match": scores.get("exact_match"),
            "final_number_accuracy": scores.get("final_number_accuracy"),
            "step_time": statistics.median(step_times) if step_times else None}


def table(results: dict) -> str:
    """One line per variant; "-" where a value is missing (no held-out loss, no numeric reference)."""
    def shown(value, form: str, scale: float = 1.0, unit: str = "") -> str:
        return "-" if value is None else format(scale * value, form) + unit

    lines = ["variant   trainable     held-out loss   exact match   final number   step time (median)"]
    for name, r in results.items():
        lines.append(f"{name:<9} {r['trainable']:>10}    {shown(r['eval_loss'], '.4f'):>13}   "
                     f"{shown(r['exact_match'], '.1f', 100, '%'):>11}   "
                     f"{shown(r['final_number_accuracy'], '.1f', 100, '%'):>12}   {shown(r['step_time'], '.2f', 1, ' s'):>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
