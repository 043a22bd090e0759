"""Run reports people can look at: report.png drawn from metrics.jsonl, and TensorBoard events.

    write_report(output_dir)             <output_dir>/report.png: loss (train, held-out) and LR vs step
    TensorBoardLog(output_dir).write(r)  <output_dir>/tensorboard/: every number of a metrics record
    append_samples(output_dir, step, s)  <output_dir>/samples.jsonl: held-out generations during training

TensorBoard is optional (`pip install .[report]`): without it the log is a no-op, noted once.
All write on rank 0 only.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from trainer.runtime import distributed

# metrics.jsonl field -> TensorBoard tag; other numeric fields go under train/<field>.
TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity",
        "eval_tokens": "eval/tokens"}
SKIPPED = ("step", "time")


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
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
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def append_samples(output_dir: str | Path, step: int, samples: list[dict[str, str]]) -> Path:
    """One line per sample: step, instruction, input, reference, prediction."""
    path = Path(output_dir) / "samples.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
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


class TensorBoardLog:
    """TensorBoard event files under <output_dir>/tensorboard, when tensorboard is installed.
    `write(record)` takes the records written to metrics.jsonl. `resumed_step`: the checkpoint's step
    a resumed run continues from (0 for a fresh start); TensorBoard hides the events a stopped run
    wrote after it, which this run writes again."""

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
        # purge_step T hides the events with step >= T; the first step this run logs is resumed_step + 1.
        self._writer = SummaryWriter(log_dir=str(self.directory), purge_step=resumed_step + 1 if resumed_step else None)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar(TAGS.get(key, f"train/{key}"), value, global_step=record["step"])
        self._writer.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        """E.g. sample generations, as markdown."""
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
