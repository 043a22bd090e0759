"""Run reports people can look at: report.png drawn from metrics.jsonl, and TensorBoard events.

    write_report(output_dir)             <output_dir>/report.png: loss (train, held-out) and LR vs step
    TensorBoardLog(output_dir).write(r)  <output_dir>/tensorboard/: every number of a metrics record
    append_samples(output_dir, step, s)  <output_dir>/samples.jsonl: held-out generations during training

TensorBoard is optional (`pip install .[report]`): without it the log is a no-op, noted once.
All write on rank 0 only. A write that fails (a full disk, the folder moved away) is one warning, and
that log stops for the rest of the run; training goes on to its next checkpoint save, which stops the
run if the disk is full (trainer/runtime/metrics_log.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

from trainer.runtime import distributed
from trainer.runtime.metrics_log import close_quietly, warn_write_failed

# metrics.jsonl field -> TensorBoard tag; other numeric fields go under train/<field>.
TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity",
        "eval_tokens": "eval/tokens"}
SKIPPED = ("step", "time")


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored, and a null (a
    non-finite number, as metrics_log's `finite` wrote it) is read back as NaN."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append({key: math.nan if value is None else value for key, value in record.items()})
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [step for step, _ in points], [value for _, value in points]


def write_report(output_dir: str | Path) -> Path | None:
    """Draw <output_dir>/report.png from <output_dir>/metrics.jsonl; None (and a note) if there is
    nothing to draw or no matplotlib (a finished run does not fail for want of a figure)."""
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed, so no report.png (pip install matplotlib, or "
              "train.report: false); metrics.jsonl has every number", file=sys.stderr)
        return None

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    if not records:
        print(f"note: no metrics in {metrics_path}; no report drawn")
        return None
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                                gridspec_kw={"height_ratios": [2, 1]})
    steps, losses = _series(records, "loss")
    loss_axis.plot(steps, losses, label="train loss", color="tab:blue", linewidth=1.2)
    eval_steps, eval_losses = _series(records, "eval_loss")
    if eval_steps:
        loss_axis.plot(eval_steps, eval_losses, label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
        best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
        loss_axis.annotate(f"best {eval_losses[best]:.3f} @ {eval_steps[best]}", (eval_steps[best], eval_losses[best]),
                           textcoords="offset points", xytext=(0, 10), ha="center", fontsize=9)
    loss_axis.set_ylabel("loss (nats per response token)")
    loss_axis.set_title(f"{output_dir.name}: loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    lr_steps, rates = _series(records, "lr")
    lr_axis.plot(lr_steps, rates, color="tab:green", linewidth=1.2)
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.set_title("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    path = output_dir / "report.png"
    try:
        figure.savefig(path, dpi=120)
    except OSError as error:
        print(f"warning: could not write {path} ({getattr(error, 'strerror', None) or error}); metrics.jsonl has "
              f"every number", file=sys.stderr)
        return None
    finally:
        plt.close(figure)
    return path


_samples_given_up: set[Path] = set()  # samples.jsonl files a failed write stopped, for the rest of the process


def append_samples(output_dir: str | Path, step: int, samples: list[dict[str, str]]) -> Path | None:
    """One line per sample: step, instruction, input, reference, prediction. None where the file could
    not be written: said once, and nothing more is appended to it in this process."""
    path = Path(output_dir) / "samples.jsonl"
    if path in _samples_given_up:
        return None
    try:
        with open(path, "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
    except OSError as error:
        _samples_given_up.add(path)
        warn_write_failed(path, error, "but appends no more samples to it this run (they are still printed)")
        return None
    return path


def format_samples(step: int, samples: list[dict[str, str]], width: int = 100) -> str:
    """The block printed during training: each question, its reference and the model's answer, one
    line each, cut to `width` characters."""
    lines = [f"samples at step {step} (greedy, held-out):"]
    for number, sample in enumerate(samples, start=1):
        question = sample["instruction"] + (f" | input: {sample['input']}" if sample["input"].strip() else "")
        lines += [f"  [{number}] question:   {_one_line(question, width)}",
                  f"      reference:  {_one_line(sample['reference'], width)}",
                  f"      prediction: {_one_line(sample['prediction'], width)}"]
    return "\n".join(lines)


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """The samples as TensorBoard text (markdown)."""
    blocks = []
    for sample in samples:
        question = sample["instruction"] + (f"\n\n{sample['input']}" if sample["input"].strip() else "")
        blocks.append(f"**question**\n\n{question}\n\n**reference**\n\n{sample['reference']}\n\n"
                      f"**prediction**\n\n{sample['prediction'] or '(empty)'}")
    return "\n\n---\n\n".join(blocks)


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[:width - 3] + "..."


class _QuietWriterThread:
    """threading.excepthook that keeps the TensorBoard writer thread's OSError quiet, and passes anything
    else on. That thread writes the events in the background: a failed write ends it with a traceback,
    and its writer raises the same error at the next write or flush, where TensorBoardLog says it once."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        self.previous(args)


class TensorBoardLog:
    """TensorBoard event files under <output_dir>/tensorboard, when tensorboard is installed.
    `write(record)` takes the records written to metrics.jsonl. `resumed_step`: the checkpoint's step
    a resumed run continues from (0 for a fresh start); TensorBoard hides the events a stopped run
    wrote after it, which this run writes again. A write that fails stops the log, with one warning."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, resumed_step: int = 0):
        self._writer = None
        if not (enabled and distributed.is_main()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: tensorboard is not installed (pip install tensorboard, or .[report]); "
                  "no TensorBoard events, metrics.jsonl and report.png only")
            return
        self.directory = Path(output_dir) / "tensorboard"
        if not isinstance(threading.excepthook, _QuietWriterThread):
            threading.excepthook = _QuietWriterThread(threading.excepthook)
        try:
            # purge_step T hides the events with step >= T; the first step this run logs is resumed_step + 1.
            self._writer = SummaryWriter(log_dir=str(self.directory),
                                         purge_step=resumed_step + 1 if resumed_step else None)
        except OSError as error:
            self._give_up(error)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if self._writer is None:
            return
        try:
            for key, value in record.items():
                if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                self._writer.add_scalar(TAGS.get(key, f"train/{key}"), value, global_step=record["step"])
            self._writer.flush()
        except OSError as error:  # raised again here after the writer thread met it
            self._give_up(error)

    def write_text(self, tag: str, text: str, step: int) -> None:
        """E.g. sample generations, as markdown."""
        if self._writer is None:
            return
        try:
            self._writer.add_text(tag, text, global_step=step)
            self._writer.flush()
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        writer, self._writer = self._writer, None
        close_quietly(writer)
        warn_write_failed(self._file_of(error), error, "but writes no more TensorBoard events this run")

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as error:  # the last events, or a failure the writer thread met since the last write
            reason = getattr(error, "strerror", None) or error
            print(f"warning: could not write the last TensorBoard events to {self._file_of(error)} ({reason}); the "
                  f"run itself is not affected", file=sys.stderr)

    def _file_of(self, error: OSError) -> str | Path:
        """The event file an error names (as bytes, from TensorBoard's file layer), else the folder."""
        return os.fsdecode(error.filename) if getattr(error, "filename", None) else self.directory
