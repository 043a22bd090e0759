"""The training process re-executes itself once with glibc malloc settings (trainer/malloc.py)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import malloc

ROOT = Path(__file__).resolve().parent.parent


def test_tunables_are_added_to_the_users_unless_they_set_malloc_or_opt_out():
    assert malloc.tunables_for({}) == malloc.TUNABLES
    assert malloc.tunables_for({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off"}) == \
        "glibc.cpu.x86_shstk=off:" + malloc.TUNABLES
    assert malloc.tunables_for({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert malloc.tunables_for({malloc.OPT_OUT: "default"}) is None
    assert malloc.tunables_for({malloc.MARKER: "1"}) is None  # already re-executed: never loops


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_apply_re_executes_the_same_command_once_with_the_tunables(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "print('started', flush=True)\n"
        "from trainer import malloc\n"
        "malloc.apply()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'pid': os.getpid(),\n"
        "                  'tunables': os.environ.get('GLIBC_TUNABLES')}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.MARKER, malloc.OPT_OUT)}
    process = subprocess.Popen([sys.executable, str(script), "a", "b=c"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=60)
    lines = out.splitlines()
    assert lines.count("started") == 2  # the second run is the re-executed one
    result = json.loads(lines[-1])
    assert result == {"argv": ["a", "b=c"], "pid": process.pid, "tunables": malloc.TUNABLES}
    # Opted out: runs once, as is.
    out = subprocess.run([sys.executable, str(script)], env={**env, malloc.OPT_OUT: "default"},
                         stdout=subprocess.PIPE, text=True, timeout=60).stdout
    assert out.splitlines().count("started") == 1 and json.loads(out.splitlines()[-1])["tunables"] is None
