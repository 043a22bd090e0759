"""The demo: fine-tune the built-in real base on the built-in tasks with 2 CPU ranks, then score the
base alone and the trained adapter on the same held-out instructions, and print them side by side.

    python launch/demo.py                                   (what `make demo` runs)
    python launch/demo.py recipes/smollm2_tasks.yaml train.max_steps=40 [section.key=value ...]

The two evaluations run at the same time, one CPU thread each. Everything they write stays under
the recipe's output_dir: eval/base-alone/ and eval/adapter/ (predictions.jsonl, metrics.json, log).
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.config import RecipeError
from trainer.recipe_loading import load_recipe

DEFAULT_RECIPE = "recipes/smollm2_tasks.yaml"
ROWS = (("exact_match", "exact match", "%"), ("final_number_accuracy", "final-number accuracy", "%"),
        ("token_f1", "token F1", "%"), ("rouge_l", "ROUGE-L", "%"), ("eval_loss", "held-out loss", ""))
EVAL_OPTIONS = ["eval.max_new_tokens=16"]  # the built-in tasks' answers are at most 7 tokens (SmolLM2) + EOS


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.strip())
        return 0
    recipe_path = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else DEFAULT_RECIPE
    overrides = argv[1:] if argv and argv[0] == recipe_path else argv
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    from trainer.checkpoint.reading import resolve_adapter
    from trainer.runtime.distributed import free_port

    # A free port of our own: the launcher would otherwise give the ranks 29500, taken or not.
    train = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
             recipe_path, *overrides]
    print("$ deepspeed " + " ".join(train[1:]), flush=True)
    code = subprocess.call(train)
    if code != 0:
        return code
    output = Path(recipe.output_dir)
    adapter = resolve_adapter(output / "checkpoints" / "best")  # through best.json where there is no link
    if not adapter.exists():
        print(f"error: training wrote no {adapter}; nothing to evaluate", file=sys.stderr)
        return 1
    runs = {"base alone": ("none", output / "eval" / "base-alone"), "adapter": (str(adapter), output / "eval" / "adapter")}
    results = evaluate_side_by_side(recipe_path, overrides, runs)
    if results is None:
        return 1
    print(table(results, str(adapter.resolve())))
    return 0


def evaluate_side_by_side(recipe_path: str, overrides: list[str], runs: dict[str, tuple[str, Path]]) -> dict | None:
    """Run launch/eval.py once per entry at the same time; their metrics, or None if one failed."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {}
    for name, (adapter, out) in runs.items():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "launch/eval.py", recipe_path, *overrides, f"adapter={adapter}", f"out={out}",
                   *EVAL_OPTIONS]
        print(f"$ python {' '.join(command[1:])}  > {out / 'log'}", flush=True)
        log = open(out / "log", "w")
        processes[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment), log, out)
    results = {}
    for name, (process, log, out) in processes.items():
        code = process.wait()
        log.close()
        if code != 0:
            print(f"error: evaluating the {name} failed (exit {code}); its output is in {out / 'log'}:\n"
                  + (out / "log").read_text()[-3000:], file=sys.stderr)
            return None
        results[name] = json.loads((out / "metrics.json").read_text())
    return results


def table(results: dict[str, dict], adapter: str) -> str:
    base, tuned = results["base alone"], results["adapter"]
    lines = [f"\nHeld-out results ({base['rows']} rows the adapter never trained on; adapter {adapter}):",
             f"  {'metric':<24}{'base alone':>12}{'adapter':>12}{'change':>12}"]
    for key, label, unit in ROWS:
        if base.get(key) is None or tuned.get(key) is None:
            continue
        scale = 100 if unit else 1
        before, after = base[key] * scale, tuned[key] * scale
        suffix = " points" if unit else ""
        lines.append(f"  {label:<24}{before:>11.1f}{unit or ' '}{after:>11.1f}{unit or ' '}"
                     f"{after - before:>+12.1f}{suffix}" if unit else
                     f"  {label:<24}{before:>12.3f}{after:>12.3f}{after - before:>+12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
