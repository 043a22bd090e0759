"""Run a Python script as `python SCRIPT ARGS...` would, then record its peak memory at exit.

    python -m launch.benchmarks.probe RESULT.json SCRIPT [ARGS...]
    python -m launch.benchmarks.probe RESULT.json -m MODULE [ARGS...]

Peak RSS is the process's own high-water mark (VmHWM), read when it exits: it covers everything
the training process held, and nothing a child held (e.g. a compiler DeepSpeed starts to build an
op). On GPU it adds `torch.cuda.max_memory_allocated`. Imports nothing heavy itself.

Under a launcher that starts one probe per rank (`deepspeed --module launch.benchmarks.probe ...`),
`{rank}` in RESULT.json is replaced by the rank (RANK in the environment), so each writes its own.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys


def peak_memory() -> dict[str, int]:
    peaks = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peaks["peak_rss_bytes"] = int(line.split()[1]) * 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peaks


def main() -> None:
    result_path, script, *arguments = sys.argv[1:]
    result_path = result_path.replace("{rank}", os.environ.get("RANK", "0"))
    atexit.register(lambda: _write(result_path, peak_memory()))
    if script == "-m":
        module, *arguments = arguments
        sys.argv = [module, *arguments]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *arguments]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
        runpy.run_path(script, run_name="__main__")


def _write(path: str, record: dict) -> None:
    with open(path, "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
