"""Ours against transformers Trainer + peft + bitsandbytes on the same QLoRA job: held-out loss curves.

    python launch/parity.py [--steps 50] [--eval-every 25] [--base builtin:smollm2-135m]
        [--dequantised] [--sequential] [--threads N] [--ours section.key=value ...] [section.key=value ...]

Both sides train from our pipeline's tokenised examples (template, prompt masking, truncation, the
same token ids whatever the tokenizer), in our batch order, with the same LoRA r/alpha/dropout and
targets, learning-rate schedule (ours), seed, global and micro batch and max length, and both are
scored the same way on the same held-out examples: summed token losses / trained tokens, before
training and every --eval-every steps. Ours runs through launch/train.py (metrics.jsonl's
eval_loss; its step 0, the base alone since LoRA's B starts at zero, is scored here with our loss
model); theirs is `launch.benchmarks.hf_trainer --held-out`. The random streams differ (LoRA's A initialisation,
dropout masks): same seed, different consumers.

By default the two sides run at once, one torch thread each (--sequential: one after the other).
--dequantised: both train a 16-bit base whose weights are the ones bitsandbytes dequantises from
this NF4 base (built once into the cache), so both compute the same fp32 forward and what is left
is the frameworks. Prints a markdown table; writes runs/parity/{results.json,table.md}.
"""
import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainer import builtin
from trainer.checkpoint.fingerprint import base_fingerprint
from trainer.model.tiny_base import MARKER
from trainer.runtime.cache import cache_dir
from trainer.runtime.report import read_metrics
from launch.benchmarks.job import RECIPE, ROOT, Job
from launch.benchmarks.results import TITLES

LIMIT = 0.02  # the relative held-out-loss difference the comparison must stay within


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:smollm2-135m", help="model.name_or_path")
    parser.add_argument("--data", default=None, help="data.path (default: GSM8K if present, else builtin:tasks)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out examples scored")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--template", default="alpaca", help="data.template")
    parser.add_argument("--dequantised", action="store_true",
                        help="both sides on a 16-bit base holding bitsandbytes' dequantised NF4 weights")
    parser.add_argument("--sequential", action="store_true", help="one side after the other (default: both at once)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per side (default: 1 at once, all cores when --sequential)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for ours only, e.g. train.onednn_matmul=false")
    parser.add_argument("--out", default="runs/parity")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for both sides")
    return parser.parse_args()


def main() -> None:
    args = parse()
    threads = args.threads or (os.cpu_count() if args.sequential else 1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import bench  # its helpers import torch, which must see the thread count first

    job = Job(base=args.base, data=args.data or bench.bench_job.default_data(), max_seq_len=args.max_seq_len,
              global_batch=args.global_batch, micro_batch=args.micro_batch, warmup_steps=0, timed_steps=args.steps,
              learning_rate=args.learning_rate, lora_dropout=args.lora_dropout)
    if args.dequantised:
        job.base = str(dequantised_base(args.base))
    overrides = [*job.overrides(), "data.eval_fraction=0.05", f"data.max_eval_rows={args.eval_rows}",
                 f"data.template={args.template}", f"train.warmup_steps={args.warmup_steps}",
                 f"train.eval_every={args.eval_every}", "train.sample_count=0",
                 *(["quant.bits=16"] if args.dequantised else []), *args.overrides]
    out = ROOT / args.out
    scratch = {name: out / name for name in TITLES}
    for directory in scratch.values():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    def theirs() -> dict:
        print("[parity] HF Trainer + peft: training ...", flush=True)
        held_out = scratch["theirs"] / "held_out.json"
        bench.run_child(["-m", "launch.benchmarks.hf_trainer", str(RECIPE), *overrides,
                         "--times", str(scratch["theirs"] / "step_ends.json"), "--held-out", str(held_out)],
                        scratch["theirs"], tuned_malloc=False)
        print("[parity] HF Trainer + peft: done", flush=True)
        return json.loads(held_out.read_text())

    def ours() -> dict:
        ours_overrides = [*overrides, *args.ours]
        print("[parity] ours: the base alone on the held-out examples ...", flush=True)
        before = ours_before_training(ours_overrides)
        print("[parity] ours: training ...", flush=True)
        run = scratch["ours"] / "run"
        bench.run_child(["launch/train.py", str(RECIPE), *ours_overrides, f"output_dir={run}"],
                        scratch["ours"], tuned_malloc=True)
        print("[parity] ours: done", flush=True)
        records = read_metrics(run / "metrics.jsonl")
        return {"held_out": {0: before, **{r["step"]: {"eval_loss": r["eval_loss"], "eval_tokens": r["eval_tokens"]}
                                           for r in records if "eval_loss" in r}},
                "train_loss": {r["step"]: r["loss"] for r in records if "loss" in r}}

    with ThreadPoolExecutor(max_workers=1 if args.sequential else 2) as pool:
        futures = {"theirs": pool.submit(theirs), "ours": pool.submit(ours)}
        results = {name: normalise(future.result()) for name, future in futures.items()}

    setting = (f"`{Path(args.base).name}` base{' dequantised to fp32 (quant.bits=16) on both sides' if args.dequantised else ''}, "
               f"`{Path(job.data).name}` with the {args.template} template, max length {job.max_seq_len}, "
               f"{args.eval_rows} held-out examples; LoRA r=16 alpha=32 dropout={job.lora_dropout} on q,k,v,o; "
               f"lr {job.learning_rate:g} ({args.warmup_steps} warmup steps, cosine to 10%), global batch "
               f"{job.global_batch} (micro {job.micro_batch}), {args.steps} steps; seed 42; "
               f"{threads} torch thread(s) per side, {'one after the other' if args.sequential else 'at once'}"
               + (f"; ours also {' '.join(args.ours)}" if args.ours else "")
               + (f"; both {' '.join(args.overrides)}" if args.overrides else "") + ".")
    table = markdown_table(results, args.eval_every, setting)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"overrides": overrides, "ours_overrides": args.ours,
                                                  "results": results}, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")


def normalise(result: dict) -> dict:
    """JSON turned the step keys into strings; back to ints, in order."""
    return {key: {int(step): value for step, value in sorted(result[key].items(), key=lambda kv: int(kv[0]))}
            for key in ("held_out", "train_loss")}


def ours_before_training(overrides: list[str]) -> dict:
    """Our held-out loss of the base alone, computed as the loop computes it (LoRA's B starts at
    zero, so this is step 0 of training)."""
    import torch

    from trainer.recipe_loading import load_recipe
    from trainer.data.pipeline import build_datasets
    from trainer.evaluation.held_out_loss import evaluate_loss
    from trainer.loss import CausalLMLoss
    from trainer.model.base import load_base, load_tokenizer, resolve_base
    from trainer import speedups

    recipe = load_recipe(RECIPE, overrides)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model, _ = load_base(recipe, device)
    speedups.apply(model, recipe, device, training=False)  # as an evaluation runs it
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    _, eval_set, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    result = evaluate_loss(CausalLMLoss(model), eval_set, recipe.train.micro_batch_size, tokenizer.pad_token_id, device)
    return {"eval_loss": result["eval_loss"], "eval_tokens": result["eval_tokens"]}


def dequantised_base(name_or_path: str) -> Path:
    """A plain fp32 copy of the base whose linear layers hold the weights bitsandbytes dequantises
    from its NF4 double-quant quantisation (what bitsandbytes' training forward multiplies by);
    built once into the cache, next to the base."""
    source = Path(builtin.resolve(name_or_path))
    if not source.is_dir():
        raise SystemExit(f"[parity] --dequantised needs a local base directory (or a builtin:); {name_or_path} is not one")
    # Keyed by the base's weights, not its directory's name: two bases in folders of one name differ.
    fingerprint = base_fingerprint(str(source))
    final = cache_dir() / "models" / f"{source.name}-{fingerprint.split(':')[-1][:12]}-nf4-dq-dequantised-v1"
    if (final / MARKER).exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.recipe_loading import load_recipe
    from trainer.model.dequantise import dequantised_weight
    from trainer.model.base import load_base

    print(f"[parity] building {final}: the NF4 weights, dequantised by bitsandbytes (first use)", flush=True)
    staging = final.parent / f".{final.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in source.iterdir():  # the tokenizer and its chat template, byte for byte
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != MARKER:
            shutil.copy(file, staging / file.name)
    recipe = load_recipe(RECIPE, [f"model.name_or_path={source}", "quant.bits=4", "quant.quant_type=nf4",
                                          "quant.double_quant=true"])
    quantised, _ = load_base(recipe, torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = dict(plain.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in quantised.named_modules():
            if type(module).__name__ == "Linear4bit":
                layers[name].weight.copy_(dequantised_weight(module).float())
                replaced += 1
    plain.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"source": str(source), "dequantised_layers": replaced}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    return final


def markdown_table(results: dict[str, dict], eval_every: int, setting: str) -> str:
    ours, theirs = results["ours"]["held_out"], results["theirs"]["held_out"]
    steps = sorted(set(ours) & set(theirs))
    lines = [f"Job: {setting}", "",
             "| step | held-out loss, ours | held-out loss, HF Trainer + peft | (ours - theirs) / theirs | within 2% |",
             "| ---: | ---: | ---: | ---: | :---: |"]
    for step in steps:
        a, b = ours[step]["eval_loss"], theirs[step]["eval_loss"]
        relative = (a - b) / b
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {relative:+.2%} | {'yes' if abs(relative) <= LIMIT else 'NO'} |")
    ours_train, theirs_train = results["ours"]["train_loss"], results["theirs"]["train_loss"]
    windows = [(start + 1, min(start + eval_every, max(ours_train, default=0)))
               for start in range(0, max(ours_train, default=0), eval_every)]
    means = []
    for first, last in windows:
        a = [ours_train[s] for s in range(first, last + 1) if s in ours_train]
        b = [theirs_train[s] for s in range(first, last + 1) if s in theirs_train]
        if a and b:
            means.append(f"steps {first}-{last} {sum(a) / len(a):.4f} vs {sum(b) / len(b):.4f}")
    if 1 in ours_train and 1 in theirs_train:
        means.insert(0, f"step 1 {ours_train[1]:.4f} vs {theirs_train[1]:.4f}")
    lines += ["", f"Training loss (mean over the global batch, ours vs theirs): {'; '.join(means)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
