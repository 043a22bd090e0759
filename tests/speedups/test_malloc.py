"""The training process re-executes itself once with glibc malloc settings (trainer/speedups/malloc.py),
on machines with no GPU visible, deciding so before torch is imported."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.speedups import malloc

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, os, sys\n"
    f"sys.path.insert(0, {str(ROOT)!r})\n"
    "print('started', flush=True)\n"
    "from trainer.speedups import malloc\n"
    "malloc.apply(__file__)\n"
    "initial = dict(item.split('=', 1) for item in open('/proc/self/environ').read().split('\\0') if '=' in item)\n"
    "print(json.dumps({'argv': sys.argv[1:], 'pid': os.getpid(), 'in_effect': initial.get('GLIBC_TUNABLES'),\n"
    "                  'environ': os.environ.get('GLIBC_TUNABLES'), 'marker': os.environ.get(malloc.MARKER)}))\n")


def test_tunables_are_added_to_the_users_unless_they_set_malloc_or_opt_out():
    assert malloc.tunables_for({}) == malloc.TUNABLES
    assert malloc.tunables_for({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off"}) == \
        "glibc.cpu.x86_shstk=off:" + malloc.TUNABLES
    assert malloc.tunables_for({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert malloc.tunables_for({malloc.OPT_OUT: "default"}) is None
    assert malloc.tunables_for({malloc.OPT_OUT: "Off"}) is None
    assert malloc.tunables_for({malloc.MARKER: ""}) is None  # already re-executed: never loops


def test_only_a_process_started_to_run_the_script_is_re_executed():
    assert malloc.started_script(["python", "-u", "launch/train.py", "--local_rank=0", "r.yaml"]) == "launch/train.py"
    assert malloc.started_script(["python", "-X", "dev", "-W", "ignore", "t.py"]) == "t.py"
    assert malloc.started_script(["python", "-m", "launch.benchmarks.probe", "m.json", "launch/train.py"]) is None
    assert malloc.started_script(["python", "-c", "import runpy"]) is None
    assert malloc.started_script(["python"]) is None


def test_a_gpu_is_visible_through_its_device_files_unless_cuda_visible_devices_hides_it(tmp_path):
    devices = tmp_path / "dev"
    devices.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "null"):  # the driver's control files are there without a GPU too
        (devices / name).touch()
    assert not malloc.gpu_visible({}, str(devices))
    (devices / "nvidia0").touch()
    assert malloc.gpu_visible({}, str(devices))
    assert malloc.gpu_visible({"CUDA_VISIBLE_DEVICES": "0"}, str(devices))
    for hidden in ("", "-1", " -1,0"):
        assert not malloc.gpu_visible({"CUDA_VISIBLE_DEVICES": hidden}, str(devices)), hidden
    (devices / "nvidia0").unlink()
    (devices / "kfd").touch()  # ROCm
    assert malloc.gpu_visible({}, str(devices))
    assert not malloc.gpu_visible({}, str(tmp_path / "missing"))


@pytest.mark.parametrize("gpu", [False, True])
def test_apply_re_executes_only_where_no_gpu_is_visible(monkeypatch, gpu):
    script = "launch/train.py"
    executed = []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(sys, "orig_argv", ["python", script, "recipe.yaml"])
    monkeypatch.setattr(malloc, "gpu_visible", lambda environ: gpu)
    monkeypatch.setattr(os, "execv", lambda *args: executed.append(args))
    # A copy: what apply() sets must not reach the other tests, or their subprocesses.
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.MARKER, malloc.OPT_OUT)}
    monkeypatch.setattr(os, "environ", environ)
    malloc.apply(script)
    assert len(executed) == (0 if gpu else 1)
    assert ("GLIBC_TUNABLES" in os.environ) == (not gpu)


def test_importing_it_imports_no_torch():
    code = "import sys; import trainer.speedups.malloc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def run(command: list[str], env: dict[str, str]) -> tuple[list[str], dict, int]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=60)
    lines = out.splitlines()
    return lines, json.loads(lines[-1]), process.pid


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_apply_re_executes_the_same_command_once_then_restores_the_environment(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.MARKER, malloc.OPT_OUT)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    lines, result, pid = run([sys.executable, "-u", str(script), "a", "b=c"], env)
    assert lines.count("started") == 2  # the second run is the re-executed one
    # The process started with the tunables (glibc parses the string in place: the first one shows)...
    assert result.pop("in_effect").startswith(malloc.TUNABLES.split(":")[0])
    # ...and its children get the environment as it was.
    assert result == {"argv": ["a", "b=c"], "pid": pid, "environ": None, "marker": None}
    # Opted out: runs once, as is.
    lines, result, _ = run([sys.executable, str(script)], {**env, malloc.OPT_OUT: "default"})
    assert lines.count("started") == 1 and result["in_effect"] is None
    # Run inside another program (runpy): that program is never restarted.
    lines, result, _ = run([sys.executable, "-c", f"import runpy; runpy.run_path({str(script)!r})"], env)
    assert lines.count("started") == 1 and result["in_effect"] is None
