"""Command-line entry shared by the launch scripts: `SCRIPT RECIPE [section.key=value ...] [--dry-run]`.

Known failures (bad recipe, data, model, checkpoint, run health, a lost rank) print one clear
message and exit 2; `--debug` or QLORA_DEBUG=1 shows the full traceback instead, and the libraries'
routine log lines that trainer/runtime/quiet.py keeps out of the output otherwise.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from trainer.analysis.loading import AnalysisError
from trainer.runtime import distributed, quiet
from trainer.checkpoint.saving import CheckpointError
from trainer.config import Recipe, RecipeError
from trainer.recipe_loading import load_recipe
from trainer.data.formats import DataError
from trainer.runtime.health import TrainingHealthError
from trainer.model.base import ModelLoadError

KNOWN_ERRORS = (RecipeError, DataError, ModelLoadError, CheckpointError, TrainingHealthError, AnalysisError,
                distributed.LaunchError)
FLAG_HELP = {"--dry-run": "check the recipe, data and model, then stop", "--debug": "full tracebacks"}
FLAGS = tuple(FLAG_HELP)  # train.py's; the scripts with options of their own take --debug alone


def usage(known: tuple[str, ...] = FLAGS) -> str:
    script = f"python {os.path.relpath(sys.argv[0])}" if sys.argv[0].endswith(".py") else "SCRIPT"
    return f"usage: {script} RECIPE.yaml [section.key=value ...] " + " ".join(f"[{flag}]" for flag in known)


def parse(argv: list[str], known: tuple[str, ...] = FLAGS) -> tuple[Recipe, list[str]]:
    # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    args = [a for a in argv if not a.startswith("--local_rank")]
    if "--help" in args or "-h" in args:
        # The script's own docstring shows its commands; the recipes' comments and README list the keys.
        print((sys.modules["__main__"].__doc__ or "").strip() or usage(known))
        print("\n" + "\n".join(f"  {flag:<10} {FLAG_HELP[flag]}" for flag in known)
              + "\nEvery recipe key (section.key=value) is commented in recipes/*.yaml; README.md explains them.")
        raise SystemExit(0)
    flags = [a for a in args if a.startswith("--")]
    unknown = [f for f in flags if f not in known]
    if unknown:
        raise RecipeError(f"unknown flag {unknown[0]}; known flags: {', '.join(known)}")
    positional = [a for a in args if not a.startswith("--")]
    if not positional:
        raise RecipeError(usage(known))
    return load_recipe(positional[0], positional[1:]), flags


def main(run: Callable[..., object], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        recipe, flags = parse(argv)
        run(recipe, dry_run=True) if "--dry-run" in flags else run(recipe)

    run_script(body, argv)


def run_script(body: Callable[[], object], argv: list[str]) -> None:
    """Run a script's body and end its process: exit 0 after success; one clear message and exit 2
    on a known error or a lost peer (`--debug` or QLORA_DEBUG=1: the traceback instead); a traceback
    and exit 1 on anything else (130 on Ctrl-C). A process that started a process group ends here,
    through trainer.runtime.distributed.finish; one that did not returns, or raises SystemExit or the error."""
    debug = "--debug" in argv or os.environ.get("QLORA_DEBUG") == "1"
    quiet.install(debug)  # the libraries' routine lines (trainer/runtime/quiet.py); --debug shows them
    try:
        body()
    except Exception as error:
        message = None if debug else _one_message(error)
        if message is not None:
            fail(message)
        if not distributed.started():
            raise
        traceback.print_exc()
        distributed.finish(1)
    except BaseException as error:  # Ctrl-C before the loop's own handler, or sys.exit in the run
        if not distributed.started():
            raise
        if isinstance(error, SystemExit):  # its code; a message is printed and exits 1, as in Python
            code = error.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            distributed.finish(code or 0)
        traceback.print_exc()
        distributed.finish(130 if isinstance(error, KeyboardInterrupt) else 1)
    distributed.finish(0)


def fail(message: str) -> None:
    """Print one clear error line and end the process with exit code 2."""
    rank = os.environ.get("RANK")
    prefix = f"error (rank {rank}): " if rank not in (None, "0") else "error: "
    # Start on a fresh line: a progress bar may hold the current one.
    print("\n" + prefix + message, file=sys.stderr, flush=True)
    distributed.finish(2)


def _one_message(error: Exception) -> str | None:
    """The message a known error or a lost peer is reported with; None for anything else."""
    if isinstance(error, KNOWN_ERRORS):
        return str(error)
    if isinstance(error, RuntimeError) and distributed.world_size() > 1 and _is_lost_peer(error):
        return (f"lost contact with another rank ({str(error).splitlines()[0][:300]}).\n"
                f"A rank or node died or the network dropped; this rank stops too. The last complete "
                f"checkpoint is intact: relaunch with resume=auto.")
    return None


def _is_lost_peer(error: RuntimeError) -> bool:
    text = str(error)
    markers = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
               "DistBackendError", "NCCL", "Gloo", "gloo", "Broken pipe")
    return type(error).__name__ == "DistBackendError" or any(marker in text for marker in markers)
