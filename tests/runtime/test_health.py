"""Run health: NaNs, a full disk, unreachable models and data, and the preflight / --dry-run."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from trainer import loop, setup
from trainer.runtime import health
from trainer.runtime.metrics_log import MetricsLog
from trainer.runtime.report import read_metrics

SHORT = ["data.max_rows=40", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=6",
         "train.warmup_steps=2", "train.save_every=2", "train.eval_every=100", "train.log_every=1",
         "data.max_eval_rows=8"]


def train(output_dir: Path, *overrides: str, env: dict | None = None, check: bool = True):
    # tests/faults.py is launch/train.py with the faults the env asks for (none: the same run).
    return run_cli(["tests/faults.py" if env else "launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *SHORT, *overrides],
                   env=env, check=check)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_stops_the_run_at_that_step_naming_step_lr_and_rows(tmp_path, tiny_base):
    result = train(tmp_path, env={"QLORA_TEST_NAN_AT_STEP": "4"}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "non-finite training values at step 4 (learning rate" in result.stderr
    assert "The batch held rows" in result.stderr and "tasks.jsonl" in result.stderr
    assert "The last complete checkpoint, step-2, is untouched; resume with resume=auto" in result.stderr
    assert (tmp_path / "checkpoints/step-2/COMPLETE").exists()
    assert not (tmp_path / "checkpoints/step-4").exists()
    assert max(r["step"] for r in records(tmp_path)) == 3
    # The checkpoint before the fault resumes.
    resumed = train(tmp_path, "resume=auto")
    assert "at step 2" in resumed.stdout and (tmp_path / "checkpoints/step-6/COMPLETE").exists()


def test_the_nan_message_offers_only_what_applies():
    """No checkpoint yet: nothing to resume from. Skip mode already on: not offered again."""
    rows = [("tasks.jsonl", [0, 4])]
    first = health.nonfinite_message(1, 1e-3, math.nan, None, rows)
    assert "No checkpoint was saved before this step" in first and "resume=auto" not in first
    assert "set train.on_nonfinite=skip" in first
    skipping = health.nonfinite_message(5, 1e-3, math.nan, 2.0, rows, skips=3, checkpoint="step-4")
    assert "after 3 consecutive skipped steps" in skipping and "The last complete checkpoint, step-4," in skipping
    assert "on_nonfinite=skip" not in skipping and "raise train.max_consecutive_skips" in skipping


def test_metrics_jsonl_writes_a_nan_loss_as_null(tmp_path):
    """JSON has no NaN: a skipped step's line must parse in strict readers (jq, JavaScript)."""
    log = MetricsLog(tmp_path)
    log.write({"step": 3, "loss": math.nan, "lr": 1e-4, "skipped": True, "parts": {"grad_norm": math.inf}})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads(line, parse_constant=refuse)
    assert record["loss"] is None and record["parts"] == {"grad_norm": None} and record["lr"] == 1e-4
    assert math.isnan(read_metrics(tmp_path / "metrics.jsonl")[0]["loss"])  # as parity.py reads it: a number


def test_nan_gradients_under_a_finite_loss_stop_the_run_on_one_rank(tmp_path, tiny_base):
    # One rank runs ZeRO-2 as stage 0, where DeepSpeed keeps no gradient norm: the loop measures it.
    result = train(tmp_path, env={"QLORA_TEST_NAN_GRAD_AT_STEP": "3"}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "run as ZeRO-0" in result.stdout
    assert "non-finite training values at step 3" in result.stderr and "gradient norm nan" in result.stderr
    held = result.stderr.split("The batch held rows ")[1].split(" of ")[0].split(", ")
    assert len(held) == 8  # the whole global batch: which micro-batch went wrong is not known
    assert max(r["step"] for r in records(tmp_path)) == 2


@pytest.mark.slow
def test_skip_mode_undoes_the_update_counts_it_and_continues(tmp_path, tiny_base):
    clean, skipping = tmp_path / "clean", tmp_path / "skip"
    train(clean, "train.max_steps=2", "train.save_every=100")
    train(skipping, "train.on_nonfinite=skip", "train.max_steps=3", "train.save_every=100",
          env={"QLORA_TEST_NAN_AT_STEP": "3"})
    skipped = [r for r in records(skipping) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    # Undoing step 3 restores exactly the state after step 2.
    from safetensors.torch import load_file

    before = load_file(str(clean / "checkpoints/step-2/adapter_model.safetensors"))
    after = load_file(str(skipping / "checkpoints/step-3/adapter_model.safetensors"))
    assert all(bool((before[k] == after[k]).all()) for k in before)


def test_skip_mode_stops_after_too_many_consecutive_skips(tmp_path, tiny_base):
    result = train(tmp_path, "train.on_nonfinite=skip", "train.max_consecutive_skips=0",
                   env={"QLORA_TEST_NAN_AT_STEP": "3"}, check=False)
    assert result.returncode == 2 and "consecutive skipped steps" in result.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    # Room for one checkpoint of the tiny adapter (~2 MiB with its Adam state), not two.
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_names_the_path(small_filesystem, tiny_base):
    output_dir = small_filesystem / "run"
    result = train(output_dir, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoint" in result.stderr and str(output_dir / "checkpoints" / "step-4") in result.stderr
    assert "MiB" in result.stderr
    assert (output_dir / "checkpoints/step-2/COMPLETE").exists()
    assert not list((output_dir / "checkpoints").glob(".tmp-*"))
    # The intact checkpoint resumes elsewhere.
    elsewhere = small_filesystem.parent / "elsewhere"
    shutil.copytree(output_dir / "checkpoints", elsewhere / "checkpoints")
    resumed = train(elsewhere, "resume=auto", "train.max_steps=3")
    assert "at step 2" in resumed.stdout


@pytest.mark.parametrize("override, expected", [
    ("model.name_or_path=/nonexistent/base", "the local directory '/nonexistent/base' does not exist"),
    ("model.name_or_path=meta-llama/Llama-2-7b-hf", "could not load the tokenizer 'meta-llama/Llama-2-7b-hf'"),
    ("model.name_or_path=nobody/no-such-model", "Point model.name_or_path at a local copy"),
    ("data.path=/nonexistent/data.json", "/nonexistent/data.json"),
    ("data.path=tatsu-lab/alpaca", "tatsu-lab/alpaca"),
])
def test_unreachable_model_or_data_is_one_clear_message(tmp_path, tiny_base, override, expected):
    result = train(tmp_path, override, "--dry-run", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    debug = train(tmp_path, override, "--dry-run", "--debug", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_dry_run_prints_the_preflight_summary_and_trains_nothing(tmp_path, tiny_base):
    result = train(tmp_path, "--dry-run")
    for field in ("preflight", "quantisation", "4-bit nf4", "trainable parameters",
                  "ZeRO-2 asked, run as ZeRO-0 (one rank: nothing to shard), world size 1",
                  "global 8 = micro 4 x accumulation 2", "tokens per step", "memory per rank", "resume from",
                  "learning rate"):
        assert field in result.stdout, field
    assert not (tmp_path / "checkpoints").exists()


def test_dry_run_refuses_an_output_dir_the_run_could_not_write(tmp_path, tiny_base):
    """The dry run writes nothing in output_dir, but refuses one the run would refuse (it said valid)."""
    (tmp_path / "a_file").write_text("")
    result = train(tmp_path / "a_file", "--dry-run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: output_dir={tmp_path / 'a_file'}: it is an existing file; output_dir must be a folder" in result.stderr
    assert "trainable parameters" not in result.stdout  # before the base loads


def test_unwritable_names_what_stops_a_folder_and_leaves_nothing_behind(tmp_path, unwritable_dir):
    from trainer.runtime.run_dir import unwritable

    assert unwritable(tmp_path / "new" / "run") is None and unwritable(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the check's own folder is removed
    (tmp_path / "a_file").write_text("")
    assert unwritable(tmp_path / "a_file") == "it is an existing file"
    assert unwritable(tmp_path / "a_file" / "run") == f"{tmp_path / 'a_file'} is an existing file"
    nearest = unwritable_dir if unwritable_dir.exists() else unwritable_dir.parent  # /proc for root
    assert unwritable(unwritable_dir / "run").startswith(f"cannot write in {nearest}: ")


def test_dry_run_on_a_broken_recipe_exits_non_zero_naming_the_problem(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "recipes/tiny_alpaca.yaml").read_text().replace("  max_steps:", "  max_stepz:"))
    result = run_cli(["launch/train.py", str(broken), "--dry-run"], check=False)
    assert result.returncode == 2 and "unknown key train.max_stepz; did you mean train.max_steps" in result.stderr


def test_an_unknown_flag_is_refused(tmp_path):
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "--dryrun"], check=False)
    assert result.returncode == 2 and "unknown flag --dryrun" in result.stderr


# The run starts the real process group (distributed.init: a world of one over gloo) or none,
# then succeeds, raises a known error, crashes, or is interrupted (Ctrl-C). An exit handler reports whether a group is still up; an
# object's finaliser reports whether the interpreter's finalisation ran.
ENTRY_POINT = """
import atexit
import sys

# Registered before anything imports logging, so it runs last (exit handlers run in reverse):
# after logging's own handler, which flushes stdout through DeepSpeed's stream handler.
atexit.register(lambda: print("exit handlers ran; process group still up:", dist.is_initialized()))

import torch.distributed as dist
from trainer import cli, options
from trainer.runtime import distributed
from trainer.config import RecipeError
from trainer.evaluation.eval_command import EvalOptions

entry, group, outcome = sys.argv[1:]

def run(recipe, *_):
    if group == "group":
        distributed.init()
        assert dist.is_initialized()
    print("body done")  # buffered: stdout is a pipe and PYTHONUNBUFFERED is off
    if outcome == "error":
        raise RecipeError("as asked")
    if outcome == "crash":
        raise ValueError("a bug")
    if outcome == "interrupt":
        raise KeyboardInterrupt

class Finalised:
    def __del__(self):
        print("interpreter finalisation ran")

witness = Finalised()
if entry == "cli":
    cli.main(run, ["recipes/tiny_alpaca.yaml"])
else:
    options.main(run, EvalOptions, "eval", ["recipes/tiny_alpaca.yaml"])
"""


@pytest.mark.parametrize("group", ["group", "no-group"])
@pytest.mark.parametrize("outcome", ["success", "error", "crash", "interrupt"])
@pytest.mark.parametrize("entry", ["cli", "options"])
def test_a_rank_leaves_without_interpreter_finalisation(entry, outcome, group):
    # In finalisation, a gloo worker thread still releasing the last collective's tensors is
    # stopped inside a C++ destructor: the rank aborts ("terminate called without an active
    # exception") after a good run, and the launcher fails the job. A rank that started a process
    # group leaves with os._exit instead, after the exit handlers and with its output flushed.
    result = run_cli(["python", "-c", ENTRY_POINT, entry, group, outcome], check=False,
                     env={"PYTHONUNBUFFERED": ""})
    expected = {"success": 0, "error": 2, "crash": 1, "interrupt": 130}[outcome]
    if outcome == "interrupt" and group == "no-group":
        expected = -signal.SIGINT  # Python's own ending for an uncaught Ctrl-C
    assert result.returncode == expected, result.stderr[-2000:]
    assert "body done\n" in result.stdout
    assert "exit handlers ran; process group still up: False" in result.stdout
    if outcome == "error":
        assert "error: as asked" in result.stderr and "Traceback" not in result.stderr
    if outcome == "crash":  # the traceback, as Python prints it
        assert "Traceback" in result.stderr and "ValueError: a bug" in result.stderr
    if outcome == "interrupt":
        assert "KeyboardInterrupt" in result.stderr
    assert ("interpreter finalisation ran" in result.stdout) == (group == "no-group")


FP16_CPU = setup.fp16_supported()


@pytest.mark.skipif(not FP16_CPU, reason="this CPU has no fp16 arithmetic, which DeepSpeed needs to train in fp16")
def test_fp16_overflow_skipped_steps_are_counted_and_the_run_goes_on(tmp_path, tiny_base):
    """In fp16, inf/NaN gradients are what DeepSpeed's loss scaler expects now and then (the scale
    starts high): it skips the update and lowers the scale. The run counts it and goes on."""
    result = train(tmp_path, "model.dtype=float16", "quant.bits=16", "train.max_steps=4", "train.save_every=100",
                   env={"QLORA_TEST_NAN_GRAD_AT_STEP": "2"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = {r["step"]: r for r in records(tmp_path)}
    skipped = [step for step, r in logged.items() if r.get("skipped")]
    assert 2 in skipped and logged[4]["overflow_skips"] == len(skipped)  # the first steps overflow too
    assert "step 2: fp16 gradient overflow, update skipped and loss scale lowered" in result.stdout
    assert all(math.isfinite(r["loss"]) for r in logged.values()) and not logged[4].get("skipped")
    assert (tmp_path / "checkpoints/step-4/COMPLETE").exists()
    saved = json.loads((tmp_path / "checkpoints/step-4/trainer_state.json").read_text())
    assert saved["overflow_skips"] == logged[4]["overflow_skips"]  # a resume counts on from there


def test_a_resumed_run_counts_fp16_overflow_skips_on_from_its_checkpoint():
    """The log's `overflow_skips` is a running count: a resume starts from the checkpoint's, not 0."""
    from dataclasses import asdict

    from trainer.checkpoint.saving import TrainState

    saved = TrainState(step=3, overflow_skips=2)
    state = TrainState(**json.loads(json.dumps(asdict(saved))))  # trainer_state.json, read back
    said = []
    skips = loop.Skips(overflows=state.overflow_skips)
    assert skips.check(4, None, 1e-4, 1.5, None, [], True, None, said.append)
    assert skips.overflows == 3 and said == ["step 4: fp16 gradient overflow, update skipped and loss scale "
                                             "lowered (3 so far)"]
    assert not skips.check(5, None, 1e-4, 1.4, 0.5, [], False, None, said.append) and skips.overflows == 3
    assert TrainState().overflow_skips == 0  # a checkpoint written before the count was kept


def test_fp16_on_a_cpu_without_fp16_arithmetic_is_refused_before_loading(monkeypatch):
    from trainer.config import RecipeError

    monkeypatch.setattr(setup, "fp16_supported", lambda: False)
    with pytest.raises(RecipeError, match="model.dtype=float16: this CPU has no fp16 arithmetic"):
        setup.check_precision(torch.float16, torch.device("cpu"))
    setup.check_precision(torch.float32, torch.device("cpu"))
    setup.check_precision(torch.bfloat16, torch.device("cpu"))


def test_the_preflight_says_when_the_warmup_outlasts_the_run():
    from trainer.config import TrainConfig
    from trainer.loop import learning_rate
    from trainer.runtime.preflight import schedule_line

    assert schedule_line(TrainConfig(max_steps=100, warmup_steps=10, learning_rate=2e-4, min_lr_ratio=0.1)) == (
        "0.0002: linear warmup over 10 steps, then cosine to 2e-05 after the last step (100)")
    assert schedule_line(TrainConfig(max_steps=100, warmup_steps=0)).startswith("0.0002: cosine to 2e-05")
    decaying = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=2e-4, min_lr_ratio=0.1)
    assert 2e-5 < learning_rate(99, decaying) < 2.01e-5 and learning_rate(100, decaying) == pytest.approx(2e-5)
    short = TrainConfig(max_steps=20, warmup_steps=30, learning_rate=2e-4)
    said = schedule_line(short)
    assert "longer than the run's 20 steps" in said and "to 67% of 0.0002" in said
    assert "set train.warmup_steps below 20" in said
    # what the loop's schedule gives at the last step (step 19 counts from 0)
    assert learning_rate(19, short) / short.learning_rate == pytest.approx(20 / 30)
    level = schedule_line(TrainConfig(max_steps=10, warmup_steps=10, learning_rate=2e-4))
    assert "warmup as long as the run: the rate rises to 0.0002 at the last step and never decays" in level
    assert learning_rate(9, TrainConfig(max_steps=10, warmup_steps=10, learning_rate=2e-4)) == pytest.approx(2e-4)
