"""Resume is a guarantee: bitwise-equal continuation, any world size, crash- and preemption-safe."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, run_cli
from trainer import setup
from trainer.checkpoint import resume

# 38 training rows with a global batch of 16: epochs end inside steps 3 and 5, and the resumed part
# (steps 4-6) crosses one. 2 ranks x micro-batch 4 x accumulation 2 = 16.
COMMON = ["data.max_rows=40", "data.eval_fraction=0.05", "train.global_batch_size=16", "train.micro_batch_size=4",
          "train.max_steps=6", "train.warmup_steps=2", "train.save_every=3", "train.eval_every=100",
          "train.log_every=1", "data.max_eval_rows=8"]


def train(output_dir: Path, *overrides: str, ranks: int = 2, env: dict | None = None, check: bool = True):
    # One torch thread per rank, whatever the caller's environment: with several, MKL may pick a
    # different thread count (and so a different fp32 summation order) from one run to the next.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    recipe_args = ["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON, *overrides]
    if ranks == 1:
        return run_cli(recipe_args, env=env, check=check)
    return run_cli(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), *recipe_args],
                   env=env, check=check)


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def resume_from_copy(straight: Path, step: int, target: Path) -> None:
    """A run stopped after `step` is that step's checkpoint in an output_dir of its own."""
    shutil.copytree(straight / "checkpoints" / f"step-{step}", target / "checkpoints" / f"step-{step}")


def assert_same_tensors(first: Path, second: Path, name: str) -> None:
    a, b = load_file(str(first / name)), load_file(str(second / name))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [
    pytest.param(0, marks=pytest.mark.slow),
    2, pytest.param(3, marks=pytest.mark.slow)])
def test_resumed_run_is_bitwise_equal_to_the_straight_run(tmp_path, tiny_base, stage):
    # Dropout on, so the restored RNG streams matter too; sample generations every 2 steps must not
    # disturb the training that follows them.
    settings = (f"deepspeed.zero_stage={stage}", "lora.dropout=0.1", "train.sample_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *settings)
    resume_from_copy(straight, 3, resumed)
    result = train(resumed, *settings, "resume=auto")
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    expected = {step: loss for step, loss in losses(straight).items() if step > 3}
    assert losses(resumed) == expected  # bitwise: exact float equality
    sampled = {json.loads(line)["step"] for line in (straight / "samples.jsonl").read_text().splitlines()}
    assert sampled == {2, 4, 6}
    final = Path("checkpoints") / "step-6"
    assert_same_tensors(straight / final, resumed / final, "adapter_model.safetensors")
    assert_same_tensors(straight / final, resumed / final, "optimizer.safetensors")
    state = json.loads((resumed / final / "trainer_state.json").read_text())
    assert (state["step"], state["examples_seen"], state["epoch"]) == (6, 96, 96 // 38)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not setup.fp16_supported(),
                    reason="this CPU has no fp16 arithmetic, which DeepSpeed needs to train in fp16")
def test_an_fp16_resume_carries_the_loss_scale_and_continues_bitwise(tmp_path, tiny_base):
    # fp16 (the auto dtype on GPUs without bf16) scales the loss dynamically; a resume that started
    # the scaler again would compute other gradients from the resumed step on.
    settings = ("model.dtype=float16", "deepspeed.zero_stage=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *settings)
    state = json.loads((straight / "checkpoints/step-3/trainer_state.json").read_text())
    saved = state["loss_scale"]
    assert saved["cur_iter"] == 3 and saved["cur_scale"] > 0
    assert state["overflow_skips"] == overflow_counts(straight)[3]
    resume_from_copy(straight, 3, resumed)
    train(resumed, *settings, "resume=auto")
    assert losses(resumed) == {step: loss for step, loss in losses(straight).items() if step > 3}
    assert_same_tensors(straight / "checkpoints/step-6", resumed / "checkpoints/step-6", "adapter_model.safetensors")
    # the log's overflow count runs on from the checkpoint's (the first steps overflow: the scale starts high)
    assert overflow_counts(resumed) == {step: count for step, count in overflow_counts(straight).items() if step > 3}


def overflow_counts(output_dir: Path) -> dict[int, int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record.get("overflow_skips", 0) for record in map(json.loads, lines)}


# Changing the world size changes the order in which per-rank gradient sums are added, so fp32
# results differ in the last bits: a relative tolerance of 1e-5 on the loss covers that, while a
# wrong batch, a lost optimizer state or a reset schedule moves the loss by far more.
WORLD_CHANGE_TOLERANCE = 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(tmp_path, tiny_base):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, ranks=2)
    resume_from_copy(straight, 3, resumed)
    train(resumed, "resume=auto", ranks=1)
    expected = {step: loss for step, loss in losses(straight).items() if step > 3}
    got = losses(resumed)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=WORLD_CHANGE_TOLERANCE), step


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks_and_the_new_rank_says_it_keeps_its_seeded_rng(tmp_path,
                                                                                              tiny_base):
    # Growing the world is the one direction with a rank the checkpoint holds no RNG state for.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, ranks=1)
    resume_from_copy(straight, 3, resumed)
    result = train(resumed, "resume=auto", ranks=2)
    assert "holds RNG states for 1 ranks; rank 1 and above keep their seeded RNG" in result.stderr
    expected = {step: loss for step, loss in losses(straight).items() if step > 3}
    got = losses(resumed)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=WORLD_CHANGE_TOLERANCE), step
    final = resumed / "checkpoints" / "step-6"
    state = json.loads((final / "trainer_state.json").read_text())
    assert (state["world_size"], state["examples_seen"]) == (2, 96)
    assert len(json.loads((final / "rng_state.json").read_text())) == 2  # both ranks' streams from now on


def start_training(output_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    # tests/faults.py is launch/train.py with the faults the env asks for.
    command = [sys.executable, "tests/faults.py" if env else "launch/train.py", "recipes/tiny_alpaca.yaml",
               f"output_dir={output_dir}",
               *COMMON, *overrides]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}):\n{process.stdout.read()[-4000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_last_complete_one_resumable(tmp_path, tiny_base):
    output_dir = tmp_path / "run"
    half_written = output_dir / "checkpoints" / ".tmp-step-4"
    process = start_training(output_dir, "train.save_every=2", env={"QLORA_TEST_SLOW_SAVE": "8"})
    # step-2 completes after its slow write; step-4 is then caught half written.
    wait_for(lambda: (half_written / "adapter_model.safetensors").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert (output_dir / "checkpoints/step-2/COMPLETE").exists()
    assert not (output_dir / "checkpoints/step-4").exists()
    assert resume.find_resume_dir(_recipe(output_dir)) == output_dir / "checkpoints" / "step-2"

    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON,
                      "train.save_every=2", "resume=auto"])
    assert "at step 2" in result.stdout
    assert (output_dir / "checkpoints/step-6/COMPLETE").exists()
    assert not half_written.exists()
    # Each step logged once: the killed run's lines after step 2 were moved aside, not appended to.
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    superseded = (output_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert superseded and all(json.loads(line)["step"] > 2 for line in superseded)


def _recipe(output_dir: Path):
    from trainer.recipe_loading import load_recipe

    return load_recipe(ROOT / "recipes/tiny_alpaca.yaml", [f"output_dir={output_dir}", "resume=auto"])


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes_from_there(tmp_path, tiny_base):
    output_dir = tmp_path / "run"
    process = start_training(output_dir, "train.max_steps=500", "train.save_every=1000")
    wait_for(lambda: (output_dir / "metrics.jsonl").exists() and len(losses(output_dir)) >= 2, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stopping at step" in output
    saved = resume.find_resume_dir(_recipe(output_dir))
    stopped_at = int(saved.name.split("-")[1])
    assert stopped_at == max(losses(output_dir)) >= 2

    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON,
                      f"train.max_steps={stopped_at + 2}", "resume=auto"])
    assert f"at step {stopped_at}" in result.stdout
    assert max(losses(output_dir)) == stopped_at + 2


# launch/train.py with SIGTERM sent to one rank (the last) while optimizer step 3 runs, after the loop
# has started the step: the flag must be read where the ranks share it, at the end of the step.
SIGTERM_IN_STEP_3 = """
import os, signal, sys
sys.path.insert(0, {root!r})
from trainer import cli, loop
from trainer.runtime import distributed
original = loop.train_step
def signalled(run, step, *args):
    if step + 1 == 3 and distributed.rank() == distributed.world_size() - 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(run, step, *args)
loop.train_step = signalled
cli.main(loop.train, sys.argv[1:])
"""


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.distributed, pytest.mark.slow])])
def test_a_signal_during_a_step_saves_at_the_end_of_that_step_on_every_rank(tmp_path, tiny_base, ranks):
    output_dir, script = tmp_path / "run", tmp_path / "sigterm_in_step_3.py"  # the launcher takes a file
    script.write_text(SIGTERM_IN_STEP_3.format(root=str(ROOT)))
    args = [str(script), "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON, "train.max_steps=6",
            "train.save_every=1000"]
    launcher = ["python"] if ranks == 1 else ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    result = run_cli([*launcher, *args], env={"OMP_NUM_THREADS": "1"})
    assert "stopping at step 3 as asked" in result.stdout, result.stdout[-3000:]
    # Rank 0 was not signalled: it stops because another rank was, at the same step.
    assert ("SIGTERM" if ranks == 1 else "signal on another rank") in result.stdout
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step-3"]
    assert max(losses(output_dir)) == 3


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tiny_base) -> Path:
    output_dir = tmp_path_factory.mktemp("small")
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON,
             "train.max_steps=2", "train.save_every=2"])
    return output_dir


def test_a_fresh_start_in_a_used_output_dir_sets_the_earlier_run_aside(small_checkpoint, tmp_path):
    # Without it, keep_last would prune the new run's step-1 and keep the earlier step-2, and best
    # and resume=auto would pick the earlier run's checkpoint.
    output_dir = tmp_path / "used"
    shutil.copytree(small_checkpoint, output_dir)
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON,
                      "train.max_steps=1", "train.save_every=1", "train.eval_every=1", "train.keep_last=1"])
    assert "held an earlier run's files; moved to" in result.stdout
    (earlier,) = (output_dir / "earlier-runs").iterdir()
    assert (earlier / "checkpoints/step-2/COMPLETE").exists() and (earlier / "metrics.jsonl").exists()
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["best", "step-1"]
    assert resume.find_resume_dir(_recipe(output_dir)) == output_dir / "checkpoints" / "step-1"
    assert list(losses(output_dir)) == [1]


def resume_with(checkpoint_run: Path, tmp_path: Path, *overrides: str, check: bool = False):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint_run / "checkpoints", target / "checkpoints")
    return run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={target}", *COMMON,
                    "train.max_steps=3", "resume=auto", *overrides], check=check), target


@pytest.mark.parametrize("override, field", [("lora.r=8", "lora.r"), ("quant.bits=16", "quant.bits"),
                                             ("lora.target_modules=q_proj,v_proj", "lora.target_modules"),
                                             ("quant.quant_type=fp4", "quant.quant_type"),
                                             ("lora.dora=true", "lora.dora"),
                                             ("data.train_on_prompt=true", "data.train_on_prompt")])
def test_resuming_with_a_different_adapter_or_base_is_refused_naming_the_field(small_checkpoint, tmp_path,
                                                                                override, field):
    result, _ = resume_with(small_checkpoint, tmp_path, override)
    assert result.returncode == 2
    assert f"{field} was" in result.stderr and "Traceback" not in result.stderr
    assert "trainable parameters" not in result.stdout  # refused before the data and the base load


@pytest.mark.slow
def test_a_resume_scoring_other_held_out_examples_chooses_the_best_afresh(small_checkpoint, tmp_path):
    state = json.loads((small_checkpoint / "checkpoints/step-2/trainer_state.json").read_text())
    assert state["best_step"] == 2 and state["held_out"]
    result, target = resume_with(small_checkpoint, tmp_path, "data.max_eval_rows=1", "train.save_every=3",
                                 "train.eval_every=3", check=True)
    assert "data.max_eval_rows changed from 8 to 1" in result.stderr
    assert "scored its held-out loss on other held-out examples than this run" in result.stderr
    resumed = json.loads((target / "checkpoints/step-3/trainer_state.json").read_text())
    assert resumed["best_step"] == 3 and resumed["held_out"] != state["held_out"]
    # The same settings: the same examples, nothing said, the best kept where it was compared.
    again, _ = resume_with(small_checkpoint, tmp_path / "again", check=True)
    assert "other held-out examples" not in again.stderr


def test_a_changed_learning_rate_is_allowed_with_a_warning(small_checkpoint, tmp_path):
    result, target = resume_with(small_checkpoint, tmp_path, "train.learning_rate=1e-3", check=True)
    assert "train.learning_rate changed" in result.stderr
    # one line, as the other warnings: not Python's "trainer/loop.py:241: UserWarning:" and the source line
    assert "\nwarning: resuming from " in result.stderr and "UserWarning" not in result.stderr
    assert max(losses(target)) == 3


def test_a_resume_with_no_step_left_says_so(small_checkpoint, tmp_path):
    result, target = resume_with(small_checkpoint, tmp_path, "train.max_steps=2", check=True)
    assert (f"nothing to train: {target / 'checkpoints' / 'step-2'} is at step 2 and train.max_steps is 2; raise "
            f"train.max_steps") in result.stdout
    assert "trainable parameters" not in result.stdout  # said before the data and the base load
    assert not (target / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_truncated_checkpoint_file_is_an_error_naming_the_file(small_checkpoint, tmp_path, name):
    target = tmp_path / "copy"
    shutil.copytree(small_checkpoint / "checkpoints", target / "checkpoints")
    broken = target / "checkpoints" / "step-2" / name
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={target}", *COMMON,
                      "train.max_steps=3", "resume=auto"], check=False)
    assert result.returncode == 2
    assert str(broken) in result.stderr and "Traceback" not in result.stderr
