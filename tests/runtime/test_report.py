"""Run reports (trainer/runtime/report.py): report.png and TensorBoard events drawn from metrics.jsonl, and
a missing plotting or TensorBoard package is a note, not a failure."""
import json

import pytest

from trainer.runtime.report import TensorBoardLog, read_metrics, write_report


def write_metrics(directory, records, torn_tail=True):
    lines = [json.dumps(r) for r in records]
    text = "\n".join(lines) + "\n" + ('{"step": 9, "lo' if torn_tail else "")
    (directory / "metrics.jsonl").write_text(text)


RECORDS = [{"step": s, "loss": 3.0 - 0.2 * s, "lr": 1e-3 * min(1, s / 2), "time": 1.0} for s in range(1, 9)]
RECORDS[3].update(eval_loss=2.5, eval_ppl=12.2, eval_tokens=100)
RECORDS[7].update(eval_loss=2.0, eval_ppl=7.4, eval_tokens=100)


def test_report_png_is_drawn_from_metrics_and_a_torn_last_line_is_ignored(tmp_path):
    write_metrics(tmp_path, RECORDS)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    path = write_report(tmp_path)
    assert path == tmp_path / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_no_metrics_no_report(tmp_path, capsys):
    assert write_report(tmp_path) is None
    assert "no metrics" in capsys.readouterr().out


def test_tensorboard_events_hold_every_number(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLog(tmp_path)
    assert log.active
    for record in RECORDS:
        log.write(record)
    log.write_text("samples", "| instruction | prediction |", step=8)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"} <= tags
    assert "train/time" not in tags
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]
    assert events.Scalars("train/loss")[0].value == pytest.approx(2.8)


def test_tensorboard_missing_is_one_note_and_a_no_op(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    log = TensorBoardLog(tmp_path)
    log.write(RECORDS[0])
    log.close()
    assert not log.active and not (tmp_path / "tensorboard").exists()
    assert capsys.readouterr().out.count("tensorboard is not installed") == 1


def test_missing_matplotlib_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    import builtins
    import sys

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for name in [n for n in sys.modules if n.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    write_metrics(tmp_path, RECORDS)
    assert write_report(tmp_path) is None and not (tmp_path / "report.png").exists()
    assert "warning: matplotlib is not installed" in capsys.readouterr().err
