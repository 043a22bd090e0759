"""The benchmark's pieces: the FLOP count, utilisation, the table, the standard jobs, the launcher
command, the profile's attribution; and (slow) the whole bench on the tiny base."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import bench  # noqa: E402

from launch.benchmarks import job as bench_job  # noqa: E402
from launch.benchmarks import peak as bench_peak  # noqa: E402
from launch.benchmarks import profile as bench_profile  # noqa: E402
from launch.benchmarks import results as bench_results  # noqa: E402

TINY_CONFIG = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 10}


def test_useful_flops_of_a_tiny_config_counted_by_hand():
    # Two examples of 3 and 5 tokens (8 tokens, sum of squares 34); 4 trained positions, 1 and 2 of the first
    # example and 3 and 4 of the second: 2 + 3 + 4 + 5 = 14 (query, key) pairs with a trained query.
    # LoRA r=2 on q and v; 2 layers, so layer 0 is the first and layer 1 the last.
    flops = bench_job.useful_flops(TINY_CONFIG, 2, ["q_proj", "v_proj"], tokens=8, trained=4, sum_squared_lengths=34,
                                   trained_pairs=14)
    # Weights: q 8x8 = 64, k and v 8x4 = 32 each, o 8x8 = 64, gate, up, down 8x16 = 128 each.
    # Layer 0: q, k, v forward only (2 x 128 x 8 tokens: no input gradient before them), o and the MLP
    # forward + input gradient (4 x 448 x 8). Layer 1: k and v at all 8 tokens (4 x 64 x 8), q, o and
    # the MLP at the 4 trained positions (4 x 512 x 4).
    assert flops["frozen linears"] == 2 * 128 * 8 + 4 * 448 * 8 + 4 * 64 * 8 + 4 * 512 * 4
    # Adapters, 6 x r x (in + out) per token: q 6 x 2 x 16, v 6 x 2 x 12; layer 0 without A's input
    # gradient (2 x r x in = 32 for each); in layer 1, q at the trained positions only.
    assert flops["LoRA"] == (192 - 32 + 144 - 32) * 8 + 144 * 8 + 192 * 4
    # Causal pairs: 3x4/2 + 5x6/2 = 21 in layer 0, the 14 with trained queries in layer 1;
    # 12 x 2 heads x head_dim 4 per pair.
    assert flops["attention"] == 12 * 2 * 4 * (21 + 14)
    # The output layer at the 4 trained positions only: forward and input gradient, 4 x vocab x hidden.
    assert flops["output layer"] == 4 * 10 * 8 * 4


def test_useful_flops_reads_head_dim_and_refuses_unknown_targets():
    wide_heads = {**TINY_CONFIG, "num_hidden_layers": 3, "head_dim": 6}  # q: 8 -> 12, k and v: 8 -> 6, o: 12 -> 8
    flops = bench_job.useful_flops(wide_heads, 2, ["q_proj"], tokens=1, trained=1, sum_squared_lengths=1,
                                   trained_pairs=1)
    # One token, trained: every layer counts it; the first layer's q, k and v without input gradient.
    weights = 8 * 12 + 2 * 8 * 6 + 12 * 8 + 3 * 8 * 16
    assert flops["frozen linears"] == 4 * 3 * weights - 2 * (8 * 12 + 2 * 8 * 6)
    assert flops["LoRA"] == 6 * 3 * 2 * (8 + 12) - 2 * 2 * 8
    assert flops["attention"] == 12 * 3 * 2 * 6 * 1
    with pytest.raises(ValueError, match="lm_head"):
        bench_job.useful_flops(TINY_CONFIG, 2, ["q_proj", "lm_head"], tokens=1, trained=0, sum_squared_lengths=1,
                               trained_pairs=0)


def test_step_tokens_count_the_pairs_of_trained_queries(monkeypatch):
    example = SimpleNamespace(input_ids=[1, 2, 3, 4], labels=[-100, -100, 7, 8])  # positions 1 and 2 trained
    monkeypatch.setattr("trainer.data.pipeline.build_datasets", lambda *args: ([example, example], None, None))
    monkeypatch.setattr("trainer.model.base.load_tokenizer", lambda *args: None)
    monkeypatch.setattr("trainer.model.base.resolve_base", lambda recipe: None)
    steps = bench_job.step_tokens(bench_job.Job(base="b", data="d", warmup_steps=0, timed_steps=1, global_batch=2,
                                                micro_batch=2))
    assert steps == [{"useful": 8, "trained": 4, "squared": 32, "trained_pairs": 2 * (2 + 3)}]


def test_cpu_peak_is_one_threads_best_rate_times_threads(monkeypatch):
    monkeypatch.setattr(bench_peak, "PEAK_SHAPES", ((64, 32, 48),))
    threads = torch.get_num_threads()
    peak = bench_peak.matmul_peak(gpu=False, threads=3)
    assert torch.get_num_threads() == threads  # measured on one thread, then put back
    assert peak["flops"] == 3 * peak["per_thread"] > 0
    assert peak["per_thread"] == peak[f"per_thread {peak['library']}"]
    assert "x 3 thread(s)" in peak["text"]


def test_cpu_peak_with_bf16_frozen_linears_is_the_rate_of_the_steps_mix(monkeypatch):
    rates = {"float32": 100e9, "bfloat16": 800e9}
    monkeypatch.setattr(bench_peak, "measured_cpu_matmul_flops", lambda repeats=5, dtype="float32": {
        "per_thread": rates[dtype], "library": "torch.mm", "per_thread torch.mm": rates[dtype]})
    flops = {bench_job.FROZEN: 800e9, "LoRA": 100e9, "attention": 100e9, "output layer": 0.0}
    assert bench_peak.matmul_peak(False, 2, flops)["flops"] == 200e9  # fp32 job: the fp32 rate x threads
    peak = bench_peak.matmul_peak(False, 2, flops, "bfloat16")
    # 800 GFLOP at 2 x 800 GFLOP/s (0.5 s) and 200 at 2 x 100 (1 s): 1,000 GFLOP in 1.5 s
    assert peak["flops"] == pytest.approx(1000e9 / 1.5)
    assert "bfloat16: one thread 800 GFLOP/s" in peak["text"] and "fp32: one thread 100 GFLOP/s" in peak["text"]
    job = bench_job.Job(base="b", data="d", quant_compute_dtype="bfloat16")
    assert "quant.compute_dtype=bfloat16" in job.overrides()


def test_summary_takes_the_median_of_the_steps_own_rates():
    job = bench_job.Job(base="b", data="d", warmup_steps=1, timed_steps=3)
    tokens = [{"useful": 100}, {"useful": 100}, {"useful": 50}, {"useful": 200}]
    run = {"step_ends": [11.0, 13.0, 14.0, 16.0], "wall_s": 20.0, "eval_loss": 1.5,
           "peak_rss_bytes": 2 ** 30, "peak_rss_largest_bytes": 2 ** 30}
    # After the warmup step (ending at 11.0) the steps take 2, 1 and 2 s for 100, 50 and 200 tokens:
    # 50, 50 and 100 tokens/s, median 50 (the mean work over the median time would say 58.3).
    summary = bench_results.summarise(run, tokens, job, step_flops=[40e9, 30e9, 100e9], peak_flops=100e9)
    assert summary["step_times_s"] == [2.0, 1.0, 2.0] and summary["step_time_median_s"] == 2.0
    assert summary["tokens_per_s_median_step"] == pytest.approx(50.0)
    # 20, 30 and 50 GFLOP/s: median 30, against a 100 GFLOP/s peak
    assert summary["utilisation"] == pytest.approx(0.3)
    assert summary["tokens_per_s"] == pytest.approx(350 / 5.0)
    assert summary["eval_loss"] == 1.5 and summary["peak_rss_mib"] == 1024


@pytest.mark.parametrize("before, after", [(100.0, 150.0), (150.0, 100.0)])
def test_utilisation_is_taken_against_the_higher_of_the_peaks_before_and_after_the_runs(before, after):
    runs = {"ours": [{"useful_flops_per_s_median_step": 300.0, "utilisation": 0.0}],
            "theirs": [{"useful_flops_per_s_median_step": 150.0}]}
    peak = bench_results.higher_peak({"flops": before, "text": "before"}, {"flops": after, "text": "after"}, runs)
    assert peak["flops"] == 150.0
    assert [r["utilisation"] for r in runs["ours"] + runs["theirs"]] == [2.0, 1.0]


def test_step_ends_leave_out_the_evaluation_after_the_last_step():
    records = [{"step": 1, "step_time": 1.0, "time": 101.0}, {"step": 2, "step_time": 2.0, "time": 103.0},
               {"step": 3, "step_time": 1.5, "time": 140.0, "eval_loss": 2.0}]
    assert bench_results.step_ends(records) == [101.0, 103.0, 104.5]


def summary(tokens_per_s: float, utilisation: float, eval_loss: float, rss: float) -> dict:
    return {"tokens_per_s_median_step": tokens_per_s, "tokens_per_s": tokens_per_s, "step_time_median_s": 1.0,
            "utilisation": utilisation, "eval_loss": eval_loss, "peak_rss_mib": rss, "peak_rss_largest_mib": rss / 2,
            "wall_s": 10.0}


def test_table_has_utilisation_and_quality_columns():
    job = bench_job.Job(base="builtin:smollm2-135m", data="gsm8k.json", warmup_steps=2, timed_steps=8)
    runs = {"ours": [summary(200.0, 0.9, 1.01, 3000.0)], "theirs": [summary(100.0, 0.45, 1.0, 6000.0)]}
    tokens = [{"useful": 1600, "trained": 900, "squared": 0}] * 10
    peak = {"flops": 100e9, "text": "fp32, one thread 100 GFLOP/s (oneDNN, measured) x 2 thread(s)"}
    flops = {"frozen linears": 60e9, "LoRA": 1e9, "attention": 4e9, "output layer": 5e9}
    table = bench_results.markdown_table(job, runs, tokens, "CPU", "on", False, False, peak, flops,
                                         {"ours": (2, 1), "theirs": (1, 2)})
    assert "| utilisation: useful FLOP/s / measured matmul peak | 90.0% | 45.0% | 2.00x |" in table
    assert "| held-out loss after step 10 (64 rows) | 1.0100 | 1.0000 | +1.00% |" in table
    assert "| peak RSS (MiB), all processes | 3,000 | 6,000 | 0.50x |" in table
    assert "| peak RSS (MiB), largest process | 1,500 | 3,000 | 0.50x |" in table
    assert "ours 2 processes x 1 thread (deepspeed launcher), theirs 1 process x 2 threads" in table
    assert "Useful GFLOP per step (launch/benchmarks/job.py `useful_flops`): 70.0" in table
    assert peak["text"] in table
    assert "prepare_model_for_kbit_training" not in table  # fp32 on CPU: nothing cast
    for run in runs["ours"] + runs["theirs"]:
        run["peak_gpu_mib"] = 1000.0
    on_gpu = bench_results.markdown_table(job, runs, tokens, "H100", "on", True, False, peak, flops,
                                          {"ours": (1, 1), "theirs": (1, 1)})
    assert "casts the weights it does not quantise (embedding, norms, output layer) to fp32" in on_gpu


def test_smollm2_job_is_the_issue_job_and_flags_override_it():
    args = bench.parse(["--job", "smollm2"])
    assert (args.base, args.threads, args.warmup, args.steps) == ("builtin:smollm2-135m", 1, 2, 8)
    job = bench.job_from(args, gpu=False)
    overrides = job.overrides()
    for expected in ("model.name_or_path=builtin:smollm2-135m", "quant.quant_type=nf4", "quant.double_quant=true",
                     "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                     "data.template=alpaca", "data.max_seq_len=256", "train.global_batch_size=8",
                     "train.micro_batch_size=8", "train.max_steps=10", f"data.path={bench_job.default_data()}"):
        assert expected in overrides
    from trainer.recipe_loading import load_recipe

    recipe = load_recipe(bench_job.RECIPE, overrides)  # every override is a key the recipe knows
    assert recipe.gradient_accumulation_steps(1) == 1 and recipe.data.max_eval_rows == 64

    smoke = bench.parse(["--job", "smollm2", "--steps", "2", "--warmup", "1", "--threads", "2"])
    assert (smoke.base, smoke.steps, smoke.warmup, smoke.threads, smoke.max_seq_len) == (
        "builtin:smollm2-135m", 2, 1, 2, 256)
    tiny = bench.parse([])
    assert (tiny.base, tiny.steps, tiny.global_batch, tiny.lora_dropout, tiny.threads) == (None, 20, 16, 0.05, None)
    with pytest.raises(SystemExit):
        bench.parse(["--ranks", "2", "--threads", "1"])


@pytest.fixture
def children(monkeypatch) -> dict:
    """What the bench would start: its subprocess.run records the command and environment instead."""
    seen = {}

    def fake_run(command, cwd, env, stdout, stderr):
        seen.update(env, command=command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    return seen


def test_bench_gives_theirs_one_gpu_and_a_real_vocabulary(tmp_path, monkeypatch, children):
    """On a multi-GPU machine HF Trainer would use DataParallel over every GPU (batch micro x GPUs)."""
    seen = children
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    bench.run_child(["-m", "launch.benchmarks.hf_trainer"], tmp_path, tuned_malloc=False)
    assert seen["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    bench.run_child(["-m", "launch.benchmarks.hf_trainer"], tmp_path, tuned_malloc=False)
    assert seen["CUDA_VISIBLE_DEVICES"] == "0"
    assert bench_job.MIN_VOCAB == 32000


def test_two_ranks_run_the_probe_per_rank_through_the_launcher(tmp_path, monkeypatch, children):
    seen = children
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    bench.run_child(["launch/train.py", "recipe.yaml"], tmp_path, tuned_malloc=False, ranks=2, threads=3)
    command = seen["command"]
    assert command[0].endswith("deepspeed") and command[1:3] == ["--num_gpus", "2"]
    assert command[-5:] == ["--module", "launch.benchmarks.probe", str(tmp_path / "memory-{rank}.json"),
                            "launch/train.py", "recipe.yaml"]
    assert "--no_local_rank" in command
    assert (seen["CUDA_VISIBLE_DEVICES"], seen["OMP_NUM_THREADS"]) == ("2,3", "3")
    for rank, peak in enumerate((3, 5)):
        (tmp_path / f"memory-{rank}.json").write_text(json.dumps({"peak_rss_bytes": peak}))
    assert bench.peak_memory(tmp_path) == {"peak_rss_bytes": 8, "peak_rss_largest_bytes": 5, "processes": 2}


def event(name: str, own: float, children: tuple = (), sequence_nr: int = -1, thread: int = 1,
          span: tuple[float, float] = (0.0, 100.0)) -> SimpleNamespace:
    made = SimpleNamespace(name=name, self_cpu_time_total=own * 1e6, cpu_children=list(children),
                           sequence_nr=sequence_nr, cpu_parent=None, thread=thread,
                           time_range=SimpleNamespace(start=span[0], end=span[1]))
    for child in children:
        child.cpu_parent = made
    return made


def test_profile_gives_each_op_to_the_innermost_part_and_backward_ops_to_their_forward_module():
    P = bench_profile
    backward = "autograd::engine::evaluate_function: "
    step = event(P.STEP, 0.5, (
        event(P.PREFIX + P.DATA, 0.25, (event("aten::copy_", 1.0),)),
        event(P.PREFIX + P.LOSS, 0.0, (
            event(P.PREFIX + P.LAYERS, 0.0, (
                event(P.PREFIX + P.ATTENTION, 2.0, (event(P.PREFIX + P.LORA, 3.0),)),
                event(P.PREFIX + P.FROZEN, 4.0, (event("bitsandbytes::dequantize_4bit", 6.0,
                                                       (event("aten::empty", 1.0),)),)))),
            event("aten::cross_entropy_loss", 7.0))),
        event(backward + "FrozenLinearBackward", 0.0, (event("bitsandbytes::dequantize_blockwise", 8.0),
                                                       event("aten::mm", 9.0)), sequence_nr=11),
        event(backward + "AddmmBackward0", 10.0, sequence_nr=12),
        event(backward + "MulBackward0", 0.125, sequence_nr=99),
        event(backward + "torch::autograd::AccumulateGrad", 0.75),
        event(P.PREFIX + P.OPTIMIZER, 2.5)))
    seconds = P.split([step, *step.cpu_children], {11: P.FROZEN, 12: P.LORA})
    assert seconds == {P.OTHER: 0.5 + 0.125, P.DATA: 1.25, P.LOSS: 7.0, P.ATTENTION: 2.0, P.LORA: 3.0 + 10.0,
                       P.FROZEN: 4.0 + 9.0, P.DEQUANTISE: 7.0 + 8.0, P.OPTIMIZER: 0.75 + 2.5, P.LAYERS: 0.0}


def test_profile_counts_backward_nodes_run_on_autograd_s_device_thread_within_the_step():
    # With CUDA tensors the backward's nodes run on a thread of autograd's own, outside the step's range.
    P = bench_profile
    backward = "autograd::engine::evaluate_function: "
    step = event(P.STEP, 0.5, (event(P.PREFIX + P.FROZEN, 4.0),), thread=1, span=(10.0, 20.0))
    inside = event(backward + "FrozenLinearBackward", 0.0, (event("aten::mm", 9.0),), sequence_nr=11, thread=2,
                   span=(12.0, 18.0))
    outside = event(backward + "FrozenLinearBackward", 3.0, sequence_nr=11, thread=2, span=(25.0, 30.0))
    events = [step, *step.cpu_children, inside, *inside.cpu_children, outside]
    assert P.split(events, {11: P.FROZEN}) == {P.OTHER: 0.5, P.FROZEN: 4.0 + 9.0}


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        from trainer.model.lora import LoRALinear

        self.q_proj = LoRALinear(nn.Linear(8, 8).requires_grad_(False), r=2, alpha=4)
        self.o_proj = nn.Linear(8, 8).requires_grad_(False)

    def forward(self, x):
        scores = torch.softmax(self.q_proj(x) @ x.transpose(-1, -2), dim=-1)
        return self.o_proj(scores @ x)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.ModuleDict({"self_attn": _Attention()})
        self.lm_head = nn.Linear(8, 10).requires_grad_(False)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head


class _Loss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, targets):
        hidden = x + self.model.decoder["self_attn"](x)
        return nn.functional.cross_entropy(self.model.lm_head(hidden), targets)


def test_profile_maps_backward_nodes_to_the_module_whose_forward_made_them():
    torch.manual_seed(0)
    model = _Model()
    nn.init.normal_(model.decoder["self_attn"].q_proj.lora_B.weight)
    loss_model = _Loss(model)
    parts = bench_profile.Parts(loss_model, model)
    parts.recording = True
    with torch.profiler.profile() as profiler:
        with torch.autograd.profiler.record_function(bench_profile.STEP):
            loss_model(torch.randn(6, 8), torch.randint(0, 10, (6,))).backward()
    owner = parts.by_sequence_number()
    found = {(e.name.split(": ")[1], owner.get(e.sequence_nr)) for e in profiler.events()
             if e.name.startswith("autograd::engine::evaluate_function") and "AccumulateGrad" not in e.name}
    assert ("SoftmaxBackward0", bench_profile.ATTENTION) in found
    assert {("NllLossBackward0", bench_profile.LOSS), ("LogSoftmaxBackward0", bench_profile.LOSS)} <= found
    # Three products with a bias-or-base added: LoRA's B (onto q's base output), o_proj, the output layer.
    assert {part for name, part in found if name == "AddmmBackward0"} == {
        bench_profile.LORA, bench_profile.FROZEN, bench_profile.LOSS}
    assert None not in {part for _, part in found}  # every node was made inside some module's forward
    seconds = bench_profile.split(profiler.events(), owner)
    step = next(e for e in profiler.events() if e.name == bench_profile.STEP)
    assert sum(seconds.values()) == pytest.approx(step.cpu_time_total / 1e6, rel=1e-6)


@pytest.mark.slow
def test_bench_on_the_tiny_base_prints_every_column_and_the_profile(tiny_base, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "launch/bench.py", "--steps", "2", "--warmup", "1", "--threads", "1", "--data",
         "builtin:tasks", "--global-batch", "4", "--micro-batch", "2", "--max-seq-len", "128", "--eval-rows", "8",
         "--profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ("utilisation: useful FLOP/s / measured matmul peak", "held-out loss after step 3 (8 rows)",
                "part of our step", bench_profile.FROZEN, bench_profile.LORA, bench_profile.ATTENTION):
        assert row in result.stdout
    found = json.loads((out / "results.json").read_text())
    ours, theirs = found["runs"]["ours"][0], found["runs"]["theirs"][0]
    assert 0 < ours["utilisation"] < 1 and 0 < theirs["utilisation"] < 1
    # Same held-out rows, same base, B = 0 at the start and 3 small steps: the two losses agree closely.
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=0.02)
    profile = found["profile"]
    assert sum(profile["seconds_per_step"].values()) == pytest.approx(profile["step_time_profiled_s"], rel=0.1)
