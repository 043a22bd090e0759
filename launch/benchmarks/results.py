"""The bench's results: the end of every optimizer step from our metrics.jsonl (`step_ends`), one
run's numbers from its step ends (`summarise`: throughput over the timed window and per median step,
utilisation, peak memory, held-out loss), a timed step's mean useful FLOPs by part, the higher of the
matmul peaks measured before and after the runs, and the markdown table that sets ours beside theirs.
"""
import statistics
from pathlib import Path

from launch.benchmarks.job import Job

# On a GPU the model is bf16, and peft's `prepare_model_for_kbit_training` (what QLoRA scripts call
# before `get_peft_model`) casts every weight it does not quantise to fp32 on their side: said in the table.
UPCAST = ("Theirs: `prepare_model_for_kbit_training` casts the weights it does not quantise (embedding, norms, "
          "output layer) to fp32, the Trainer's autocast runs the products in bf16; ours keeps those weights in bf16. ")
TITLES = {"ours": "ours", "theirs": "HF Trainer + peft"}


def step_ends(records: list[dict]) -> list[float]:
    """The wall clock at the end of each step, as for theirs, from metrics.jsonl's records. A record
    with an evaluation was written after it: its step ended step_time after the previous one's."""
    if not all("time" in r for r in records):  # summed step_time if a log lacks the clock
        return [sum(r["step_time"] for r in records[:i + 1]) for i in range(len(records))]
    ends: list[float] = []
    for record in records:
        evaluated = "eval_loss" in record and ends
        ends.append(ends[-1] + record["step_time"] if evaluated else record["time"])
    return ends


def summarise(run: dict, tokens: list[dict], job: Job, step_flops: list[float], peak_flops: float) -> dict:
    """One run's numbers. The median-step rates are medians of each timed step's own rate (its
    useful tokens, or FLOPs, over its time): steps carry different amounts of work, so the median
    step's time alone, against the mean work, would favour whichever side pads less."""
    ends = run["step_ends"]
    step_times = [b - a for a, b in zip(ends[job.warmup_steps - 1:], ends[job.warmup_steps:])]
    useful = [t["useful"] for t in tokens[job.warmup_steps:]]
    flop_rate = statistics.median(flops / seconds for flops, seconds in zip(step_flops, step_times))
    summary = {"tokens_per_s": sum(useful) / sum(step_times),
               "tokens_per_s_median_step": statistics.median(n / seconds for n, seconds in zip(useful, step_times)),
               "step_time_median_s": statistics.median(step_times), "step_times_s": step_times,
               "useful_flops_per_s_median_step": flop_rate, "utilisation": flop_rate / peak_flops,
               "peak_rss_mib": run["peak_rss_bytes"] / 2 ** 20,
               "peak_rss_largest_mib": run["peak_rss_largest_bytes"] / 2 ** 20, "wall_s": run["wall_s"]}
    if run.get("eval_loss") is not None:
        summary["eval_loss"] = run["eval_loss"]
    if "peak_gpu_allocated_bytes" in run:
        summary["peak_gpu_mib"] = run["peak_gpu_allocated_bytes"] / 2 ** 20
    return summary


def mean_parts(per_step: list[dict[str, float]]) -> dict[str, float]:
    """A timed step's useful FLOPs by part, the mean over the timed steps."""
    return {part: statistics.mean(step[part] for step in per_step) for part in per_step[0]}


def higher_peak(before: dict, after: dict, runs: dict[str, list[dict]]) -> dict:
    """The higher of the peaks measured before and after the runs, with every run's utilisation taken
    against it. A shared machine's speed drifts by +-15% over minutes: a peak measured in a slow spell
    alone would flatter the utilisation."""
    peak = after if after["flops"] > before["flops"] else before
    for summary in (summary for framework in runs.values() for summary in framework):
        summary["utilisation"] = summary["useful_flops_per_s_median_step"] / peak["flops"]
    return peak


def markdown_table(job: Job, runs: dict[str, list[dict]], tokens: list[dict], device: str, packing: str,
                   gpu: bool, same_allocator: bool, peak: dict, flops: dict[str, float],
                   layout: dict[str, tuple[int, int]]) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    times = lambda ours, theirs: f"{ours / theirs:.2f}x"  # noqa: E731
    rows = [("useful (non-pad) tokens/s, median step", "tokens_per_s_median_step", "{:,.0f}", times),
            ("useful (non-pad) tokens/s, whole timed window", "tokens_per_s", "{:,.0f}", times),
            ("step time, median (s)", "step_time_median_s", "{:.3f}", times),
            ("utilisation: useful FLOP/s / measured matmul peak", "utilisation", "{:.1%}", times)]
    if "eval_loss" in runs["ours"][0] and "eval_loss" in runs["theirs"][0]:
        rows.append((f"held-out loss after step {job.total_steps} ({job.eval_rows} rows)", "eval_loss", "{:.4f}",
                     lambda ours, theirs: f"{(ours - theirs) / theirs:+.2%}"))
    several = layout["ours"][0] > 1
    rows.append(("peak RSS (MiB)" + (", all processes" if several else ""), "peak_rss_mib", "{:,.0f}", times))
    if several:
        rows.append(("peak RSS (MiB), largest process", "peak_rss_largest_mib", "{:,.0f}", times))
    if gpu:
        rows.append(("peak GPU memory allocated (MiB)", "peak_gpu_mib", "{:,.0f}", times))
    rows.append(("process wall time: start-up, steps, evaluation, final save (ours; theirs saves nothing) (s)",
                 "wall_s", "{:.0f}", times))
    timed = tokens[job.warmup_steps:]
    shape = {name: f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
             for name, (processes, threads) in layout.items()}
    products = "" if job.quant_compute_dtype == "auto" else f" (its products in {job.quant_compute_dtype})"
    lines = [
        f"Job: `{Path(job.base).name}` base, NF4 double-quant{products}, "
        f"LoRA r=16 alpha=32 dropout={job.lora_dropout} on q,k,v,o; "
        f"data `{Path(job.data).name}`, max length {job.max_seq_len}, global batch {job.global_batch} "
        f"(micro {job.micro_batch}), {job.timed_steps} timed steps after {job.warmup_steps} warmup, "
        f"{sum(t['useful'] for t in timed) / len(timed):,.0f} useful tokens per step. "
        f"Activation checkpointing {'on' if job.activation_checkpointing else 'off'} (both); ours' packing {packing}; "
        f"glibc malloc tunables (trainer/speedups/malloc.py) for {'both' if same_allocator else 'ours only'}. "
        f"{UPCAST if gpu else ''}"
        f"Device: {device}; ours {shape['ours']}{' (deepspeed launcher)' if several else ''}, theirs {shape['theirs']}; "
        f"median of {len(runs['ours'])} run(s) each.",
        "",
        f"| metric | {TITLES['ours']} | {TITLES['theirs']} | ours / theirs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for title, key, fmt, ratio in rows:
        ours, theirs = median("ours", key), median("theirs", key)
        lines.append(f"| {title} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio(ours, theirs)} |")
    parts = ", ".join(f"{part} {value / 1e9:,.1f}" for part, value in flops.items())
    lines += ["", f"Useful GFLOP per step (launch/benchmarks/job.py `useful_flops`): {sum(flops.values()) / 1e9:,.1f} "
                  f"({parts}). Matrix-multiply peak (the higher of the measurements before and after the runs): "
                  f"{peak['text']}."]
    if len(runs["ours"]) > 1:
        # Runs alternate ours, theirs, theirs, ours, ...: a pair shares the machine's state at the time, so the
        # ratio within each pair is less exposed to a slow spell than the ratio of the medians.
        pairs = [ours["tokens_per_s_median_step"] / theirs["tokens_per_s_median_step"]
                 for ours, theirs in zip(runs["ours"], runs["theirs"])]
        memory = [ours["peak_rss_mib"] / theirs["peak_rss_mib"] for ours, theirs in zip(runs["ours"], runs["theirs"])]
        lines += ["", f"Per run pair, ours / theirs: tokens/s (median step) {', '.join(f'{r:.2f}x' for r in pairs)} "
                      f"(median {statistics.median(pairs):.2f}x); peak RSS {', '.join(f'{r:.2f}x' for r in memory)}."]
    return "\n".join(lines)
