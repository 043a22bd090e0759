"""A run's output holds our lines: the libraries' routine ones (trainer/runtime/quiet.py) are dropped,
shown again with --debug, and the libraries' other warnings still get through."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from _checkpoints import ONE_THREAD
from conftest import ROOT, run_cli
from trainer.runtime.quiet import DropNoise, install

NOISE = ("gemm_4bit_forward", "kernels-community", "past_key_values", "Loading weights", "[INFO]",
         "Setting accelerator", "FutureWarning", "is deprecated", "Writing model shards")


def test_a_tiny_run_prints_only_our_lines(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "train.max_steps=2", "train.eval_every=2",
                      "train.save_every=2", "train.sample_every=1", "train.sample_count=1", f"output_dir={out}"],
                     env=ONE_THREAD, timeout=300)
    output = result.stdout + result.stderr
    assert "samples at step 1" in output and "saved" in output  # generation and saving did run
    assert [line for line in output.replace("\r", "\n").splitlines() if any(noise in line for noise in NOISE)] == []


# In a fresh interpreter: what a launch script does before the libraries load, then the libraries.
SCRIPT = """
import logging, sys
from trainer.runtime.quiet import install
install(debug=sys.argv[1] == "debug")
import bitsandbytes  # its CPU backend logs the kernels-community line at import where the hub kernel is refused
import deepspeed
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[2])
logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
logging.getLogger("DeepSpeed").info("a DeepSpeed info line")
print("done")
"""


@pytest.mark.slow
def test_debug_shows_the_library_lines_again(tiny_base):
    outputs = {}
    for mode in ("quiet", "debug"):
        result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tiny_base)], cwd=ROOT, capture_output=True,
                                text=True, env={**__import__("os").environ, **ONE_THREAD}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[mode] = result.stdout + result.stderr
    assert "a real DeepSpeed warning" in outputs["quiet"]
    assert "Loading weights" not in outputs["quiet"] and "Loading weights" in outputs["debug"]
    assert "Setting accelerator to CPU" not in outputs["quiet"] and "Setting accelerator to CPU" in outputs["debug"]
    if "gemm_4bit_forward" in outputs["debug"]:  # only where bitsandbytes tries the hub kernel
        assert "gemm_4bit_forward" not in outputs["quiet"]


def test_filters_drop_only_the_named_lines():
    drop = DropNoise(("Failed to load CPU gemm_4bit_forward",), below=logging.WARNING)

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, message, None, None)

    assert not drop.filter(record(logging.WARNING, "Failed to load CPU gemm_4bit_forward from kernels-community: x"))
    assert not drop.filter(record(logging.INFO, "cmd = deepspeed ..."))
    assert drop.filter(record(logging.WARNING, "Failed to load the 8-bit kernel"))
    assert drop.filter(record(logging.ERROR, "something real"))
    install(debug=True)  # --debug installs nothing


def test_deepspeeds_deprecated_gather_and_scatter_warnings_are_dropped_and_other_future_warnings_kept():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]


def test_our_warnings_are_one_line_and_a_librarys_keeps_its_format_whoever_called_it(monkeypatch, capsys):
    import warnings

    from trainer.runtime.quiet import TrainerWarning

    def python_format(message, category, *args, **kwargs):  # stands for Python's (pytest records them here)
        print(f"path:1: {category.__name__}: {message}", file=sys.stderr)

    monkeypatch.setattr(warnings, "showwarning", python_format)  # restored after the test
    monkeypatch.delenv("RANK", raising=False)
    install()
    warnings.showwarning(TrainerWarning("resuming with x changed"), TrainerWarning, "trainer/loop.py", 241)
    # a library's warning raised with stacklevel=2 from one of our calls names our file: still its own format
    warnings.showwarning(FutureWarning("old() is deprecated"), FutureWarning, str(ROOT / "trainer/loop.py"), 9)
    printed = capsys.readouterr().err
    assert printed.startswith("warning: resuming with x changed\n")
    assert "FutureWarning: old() is deprecated" in printed and "UserWarning" not in printed
