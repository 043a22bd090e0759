"""Rank-deficiency analysis of trained LoRA adapters (issue 9): spectra, effective ranks, amplification,
and the subspace similarity of two adapters. Prints a table per adapter, writes analysis.json and PNG figures.

    python launch/analyze.py runs/tiny_alpaca/checkpoints/step-400 [<second adapter dir>] [out=<dir>]
        [threshold=0.9] [base=<base model dir>] [seed=0] [--debug]

A bad path or option prints one message and exits 2; `--debug` or QLORA_DEBUG=1 shows the traceback instead.
Needs neither DeepSpeed nor a GPU.
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from trainer import cli, options
from trainer.analysis.figures import print_report, write_outputs
from trainer.analysis.loading import AnalysisError, adapter_files
from trainer.analysis.ranks import analyze
from trainer.checkpoint.reading import adapter_instead, resolve_adapter
from trainer.checkpoint.best import BEST
from trainer.checkpoint.saving import CheckpointError

USAGE = ("usage: python launch/analyze.py <adapter dir> [<second adapter dir>] "
         "[out=<dir>] [threshold=0.9] [base=<base model dir>] [seed=0] [--debug]")


@dataclass
class AnalyzeOptions:
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("out", "threshold", "base", "seed")
    out: str | None = None  # default <run>/analysis/step-<N> (<adapter>/analysis outside a run)
    threshold: float = 0.9  # energy kept by the effective rank
    base: str | None = None  # base model directory: amplification against its weights
    seed: int = 0  # randomized SVD of large base weights


def run(argv: list[str]) -> None:
    given, adapters = options.split_argv([arg for arg in argv if arg != "--debug"], AnalyzeOptions, "analyze")
    opts = options.parse_options(AnalyzeOptions, given, "analyze")
    unknown = [arg for arg in adapters if "=" in arg and not Path(arg).exists()]
    if unknown:
        raise AnalysisError(f"unknown option {unknown[0].partition('=')[0]}= "
                            f"(valid: {', '.join(AnalyzeOptions.TOP_LEVEL)})\n{USAGE}")
    if not 1 <= len(adapters) <= 2:
        raise AnalysisError(f"expected one or two adapter directories, got {len(adapters)}\n{USAGE}")
    if not 0 < opts.threshold <= 1:
        raise AnalysisError(f"threshold must be in (0, 1], got {opts.threshold}")
    # checkpoints/best read as the step it names (a later `best` must not change what was analysed); a
    # mistyped adapter is named as such, before out= is made
    adapters = [str(checked(adapter)) for adapter in adapters]
    out = output_dir(Path(opts.out) if opts.out else default_out([Path(adapter) for adapter in adapters]))
    report = analyze(adapters, opts.threshold, opts.base, opts.seed)
    print_report(report)
    try:
        written = write_outputs(report, out)
    except OSError as error:  # a full disk, or a directory taken away during the analysis
        raise AnalysisError(f"out={out}: could not write the analysis there: {error}") from None
    print(f"\nwrote {', '.join(path.name for path in written)} to {out}")


def checked(adapter: str) -> Path:
    """The adapter directory to read: `best` resolved to its step-<N>; one holding no adapter is
    refused naming what to give instead (a run's folder: its checkpoints/best), as eval does."""
    try:
        path = resolve_adapter(adapter)
    except CheckpointError as error:
        raise AnalysisError(str(error)) from None
    looks_like_a_run = (path / "checkpoints").is_dir() or path.name in ("checkpoints", BEST)
    if looks_like_a_run and not (path / "adapter_config.json").is_file():
        raise AnalysisError(f"{adapter}: no adapter_config.json there ({adapter_instead(path, give='')})")
    adapter_files(path)
    return path


def default_out(adapters: list[Path]) -> Path:
    """Where the files go without out=: beside a run's checkpoints, not inside one (keep_last prunes
    checkpoints, and would take the analysis with them): <run>/analysis/step-<N>, or
    step-<N>-vs-step-<M> for two (the second named with its run where that is another); <adapter>/analysis for
    an adapter outside a run."""
    first = adapters[0]
    if first.parent.name != "checkpoints":
        return first / "analysis"
    # a second adapter of another run is named with its run: step-100-vs-other_run-step-100
    names = [adapter.name if adapter.parent == first.parent or adapter.parent.name != "checkpoints"
             else f"{adapter.parent.parent.name}-{adapter.name}" for adapter in adapters]
    return first.parent.parent / "analysis" / "-vs-".join(names)


def output_dir(out: Path) -> Path:
    """`out`, made if missing, before the analysis runs: a path that cannot hold its files fails in a
    second with one message, not after minutes of SVDs with a traceback."""
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"out={out}: is a file, not a directory; pass out=<a directory> (made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnalysisError(f"out={out}: cannot make this directory ({error.strerror or error}); pass "
                            f"out=<a directory you can write to>") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise AnalysisError(f"out={out}: not writable; pass out=<a directory you can write to>")
    return out


if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(USAGE)
        sys.exit(0)
    cli.run_script(lambda: run(sys.argv[1:]), sys.argv[1:])
