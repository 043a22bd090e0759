"""Shared fixtures. The built-in tiny base is built once per session into a temporary cache, and
every subprocess the tests start sees the same cache through QLORA_TRAINER_CACHE."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
VENV_BIN = Path(sys.executable).parent


SHARED_MEMORY = Path("/dev/shm")


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """DeepSpeed's CPU all-reduce keeps 69 MB buffers in /dev/shm, and ranks the tests kill (kill -9,
    hung nodes) never unlink theirs; on a machine that runs the suite often they fill its memory.
    At the end, remove the ones created during this session that no live process still maps."""
    started = time.time()
    yield
    if not SHARED_MEMORY.is_dir():
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1].strip() for line in maps.read_text().splitlines()
                          if "/dev/shm/" in line)
        except OSError:  # the process ended, or is not ours to read
            continue
    for buffer in SHARED_MEMORY.glob("deepspeed_*"):
        try:
            if buffer.stat().st_mtime >= started - 1 and str(buffer) not in mapped:
                buffer.unlink()
        except OSError:
            continue


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("QLORA_TEST_CACHE") or tmp_path_factory.mktemp("qlora_cache"))
    os.environ["QLORA_TRAINER_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One torch thread per process: the suite runs several ranks at once on 2 cores, and
    # oversubscribed thread pools make small ops orders of magnitude slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_base(session_cache) -> Path:
    from trainer.builtin import ensure_tiny_base

    return ensure_tiny_base("tiny-llama")


@pytest.fixture(scope="session")
def small_base_path(session_cache) -> str:
    """A 2-layer, width-64 built-in base for unit tests of the loss and packing."""
    from trainer.builtin import ensure_tiny_base

    return str(ensure_tiny_base("bench-tiny", hidden_size=64, intermediate_size=176, num_hidden_layers=2))


@pytest.fixture(scope="session")
def small_tokenizer(small_base_path):
    from trainer.config import recipe_from_dict
    from trainer.model import load_tokenizer

    return load_tokenizer(small_base_path, recipe_from_dict({"model": {"name_or_path": small_base_path}}))


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch script or the deepspeed launcher from the repository root."""
    program = str(VENV_BIN / "deepspeed") if args[0] == "deepspeed" else sys.executable
    command = [program, *args[1:]] if args[0] in ("deepspeed", "python") else [sys.executable, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
