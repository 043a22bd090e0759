"""The training process re-executes itself once with glibc malloc settings (trainer/malloc.py)."""
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
    "from trainer import malloc\n"
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
