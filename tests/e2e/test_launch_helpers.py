"""The launch scripts' own helpers: the variants table with missing values, its --only check, its
arguments (overrides without a recipe, a bad recipe in one line), its runs' output shown and kept, a rerun's
earlier run set aside with its logs, a failed run's message, the
demo's --help, and parity's dequantised-base cache keyed by the base's weights."""
from __future__ import annotations

import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import demo  # noqa: E402
import parity  # noqa: E402
import variants  # noqa: E402


def test_the_variants_table_shows_a_dash_where_a_value_is_missing():
    rows = {"lora": {"trainable": "1,843,200", "eval_loss": 0.8631, "exact_match": 0.5, "final_number_accuracy": 0.31,
                     "step_time": 3.2},
            "dora": {"trainable": "1,889,280", "eval_loss": None, "exact_match": 0.25, "final_number_accuracy": None,
                     "step_time": None}}
    lines = variants.table(rows).splitlines()
    assert lines[1].split() == ["lora", "1,843,200", "0.8631", "50.0%", "31.0%", "3.20", "s"]
    assert lines[2].split() == ["dora", "1,889,280", "-", "25.0%", "-", "-"]
    with pytest.raises(SystemExit) as exited:
        variants.main(["--only", "lora,dorra"])
    assert exited.value.code == 2


def test_variants_takes_overrides_without_a_recipe_and_reports_a_bad_recipe_in_one_line(capsys):
    # As launch/demo.py: lora.r=0 is an override on the default recipe (not a recipe path), refused in one line.
    assert variants.main(["lora.r=0", "--ranks", "1"]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"error: {variants.DEFAULT_RECIPE}: lora.r: must be positive") and "Traceback" not in said
    assert variants.main(["recipes/nope.yaml", "lora.r=8"]) == 2
    assert "error: recipe not found: recipes/nope.yaml" in capsys.readouterr().err


def test_variants_shows_each_run_as_it_goes_and_keeps_its_log(tmp_path, capfd):
    command = [sys.executable, "-c", "import sys; print('step 1', flush=True); sys.stderr.write('bar\\r'); sys.exit(3)"]
    code, output = variants.shown_and_logged(command, {}, tmp_path / "run" / "train.log")
    assert code == 3 and output == "step 1\nbar\r"
    assert (tmp_path / "run" / "train.log").read_bytes().decode() == output
    assert capfd.readouterr().out.startswith("step 1\nbar")  # shown, stderr's progress bars included


def fake_runs(calls: list, failing: str | None = None):
    """A stand-in for shown_and_logged: each call writes its log line and what training or evaluation
    leaves in the run folder (a fresh run's mkdir fails on an earlier run's folders); `failing` exits 1."""
    def run(command, env, log, append=False):
        calls.append((log.name, append))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a" if append else "w") as kept:
            kept.write(f"{log.name}, call {len(calls)}\n")
        if log.name == failing:
            return 1, ""
        if log.name == "train.log":
            (log.parent / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=append)
            (log.parent / "metrics.jsonl").write_text('{"step": 2, "step_time": 1.5}\n')
            return 0, "trainable parameters: 1,024"
        (log.parent / "eval").mkdir(exist_ok=append)
        (log.parent / "eval" / "metrics.json").write_text('{"eval_loss": 0.5, "exact_match": 0.25}')
        return 0, ""
    return run


def test_a_variants_rerun_sets_the_earlier_run_aside_logs_included(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(variants, "shown_and_logged", fake_runs(calls))
    arguments = ["recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", "--only", "lora", "--ranks", "1"]
    assert variants.main(arguments) == 0
    assert variants.main(arguments) == 0
    said = capsys.readouterr().out
    [earlier] = (tmp_path / "lora" / "earlier-runs").iterdir()
    assert f"lora: an earlier run's files in {tmp_path / 'lora'} moved to {earlier}" in said
    assert (earlier / "train.log").read_text() == "train.log, call 1\n"
    assert (earlier / "eval.log").read_text() == "eval.log, call 2\n"
    assert (earlier / "checkpoints" / "step-2").is_dir() and (earlier / "eval" / "metrics.json").exists()
    assert (tmp_path / "lora" / "train.log").read_text() == "train.log, call 3\n"
    # resume=...: the run continues in place, its logs appended to
    assert variants.main([*arguments, "resume=auto"]) == 0
    assert calls == [("train.log", False), ("eval.log", False)] * 2 + [("train.log", True), ("eval.log", True)]
    assert (tmp_path / "lora" / "train.log").read_text() == "train.log, call 3\ntrain.log, call 5\n"
    assert list((tmp_path / "lora" / "earlier-runs").iterdir()) == [earlier]


def test_a_variants_rerun_moves_nothing_of_a_run_still_writing_there(tmp_path, monkeypatch, capsys):
    import subprocess

    calls = []
    monkeypatch.setattr(variants, "shown_and_logged", fake_runs(calls))
    live = tmp_path / "lora"
    live.mkdir()
    (live / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(live / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert variants.main(["recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", "--only", "lora",
                              "--ranks", "1"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert capsys.readouterr().err.startswith("error: ") and calls == []
    assert (live / "metrics.jsonl").exists() and not (live / "earlier-runs").exists()


def test_variants_appends_to_the_logs_of_a_resumed_run(tmp_path):
    log = tmp_path / "run" / "train.log"
    for word in ("first", "second"):
        variants.shown_and_logged([sys.executable, "-c", f"print('{word}')"], {}, log, append=True)
    assert log.read_text() == "first\nsecond\n"


def test_a_failed_variant_run_names_its_log_and_stops(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(variants, "shown_and_logged", fake_runs(calls, failing="train.log"))
    assert variants.main(["recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", "--ranks", "1"]) == 1
    assert capsys.readouterr().err == (f"error: training lora failed (exit 1); its output is in "
                                       f"{tmp_path / 'lora' / 'train.log'}\n")
    assert calls == [("train.log", False)]  # no evaluation, no further variant


def test_demo_answers_help_with_its_usage_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(demo.subprocess, "call", lambda *args, **kwargs: pytest.fail("--help started training"))
    for flag in ("--help", "-h"):
        assert demo.main([flag]) == 0
        assert "python launch/demo.py recipes/smollm2_tasks.yaml" in capsys.readouterr().out


def test_two_bases_in_folders_of_one_name_get_their_own_dequantised_copy(tmp_path, tiny_base, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(parity, "cache_dir", lambda: tmp_path / "cache")
    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_base, first)
    shutil.copytree(tiny_base, second)
    weights = next(second.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(key for key in tensors if key.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 3
    save_file(tensors, weights)
    one, other = parity.dequantised_base(str(first)), parity.dequantised_base(str(second))
    assert one != other and parity.dequantised_base(str(first)) == one
    read = lambda directory: load_file(next(directory.glob("*.safetensors")))[name]  # noqa: E731
    assert not torch.allclose(read(one), read(other))


def test_parity_names_a_base_it_cannot_dequantise():
    with pytest.raises(SystemExit, match="--dequantised needs a local base directory"):
        parity.dequantised_base("some-org/not-a-local-dir")
