"""A log that cannot be written (a full disk, its folder moved away) is one warning and stops that log;
training goes on to its next checkpoint save, which decides."""
import errno
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from trainer.runtime import metrics_log, report
from trainer.runtime.metrics_log import MetricsLog
from trainer.runtime.report import TensorBoardLog, append_samples, write_report

RECORD = {"step": 1, "loss": 2.5, "lr": 1e-3}
SAMPLE = {"instruction": "q", "input": "", "reference": "a", "prediction": "b"}


class FullDisk(io.StringIO):
    """A file on a full disk: what is written stays in the buffer, and writing it out fails."""

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        try:
            self.flush()
        finally:
            super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """`open` in the log modules opens a file on a full disk."""
    for module in (metrics_log, report):
        monkeypatch.setattr(module, "open", lambda *args, **kwargs: FullDisk(), raising=False)


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: could not write")]


def test_a_full_disk_under_metrics_jsonl_is_one_warning_and_the_log_stops(tmp_path, capsys, full_disk):
    log = MetricsLog(tmp_path)
    for step in range(1, 4):
        log.write({**RECORD, "step": step})
    log.close()
    (warning,) = warnings_in(capsys.readouterr().err)
    assert str(tmp_path / "metrics.jsonl") in warning and "No space left on device" in warning
    assert "training goes on" in warning and "next checkpoint save" in warning


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full device here")
def test_metrics_jsonl_on_dev_full_is_one_warning(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    log = MetricsLog(tmp_path)
    log.write(RECORD)
    log.write(RECORD)
    log.close()
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "No space left on device" in warning


def test_metrics_jsonl_is_written_as_before(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    log.write(RECORD)
    log.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["loss"] == 2.5 and capsys.readouterr().err == ""


def test_a_full_disk_under_samples_jsonl_is_one_warning(tmp_path, capsys, full_disk):
    assert append_samples(tmp_path, 2, [SAMPLE]) is None
    assert append_samples(tmp_path, 4, [SAMPLE]) is None
    (warning,) = warnings_in(capsys.readouterr().err)
    assert str(tmp_path / "samples.jsonl") in warning and "No space left on device" in warning


def test_a_report_png_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", no_space)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert write_report(tmp_path) is None
    assert "could not write" in capsys.readouterr().err


def write_until_stopped(log: TensorBoardLog) -> int:
    """Write records until the log gives up (the writer thread meets the error after a write returns,
    and its writer raises it at a later one); how many were written."""
    for step in range(2, 200):
        log.write({**RECORD, "step": step})
        if not log.active:
            return step
        time.sleep(0.02)
    raise AssertionError("the TensorBoard log never gave up")


@pytest.fixture
def thread_failures(monkeypatch):
    """What reaches threading.excepthook (a traceback on stderr, outside tests)."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


def no_space(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_tensorboard_is_one_warning_and_no_traceback(tmp_path, monkeypatch, capfd,
                                                                       thread_failures):
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer

    log = TensorBoardLog(tmp_path)
    log.write(RECORD)
    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    write_until_stopped(log)
    log.write({**RECORD, "step": 300})
    log.write_text("samples", "text", step=300)
    log.close()
    err = capfd.readouterr().err
    (warning,) = warnings_in(err)
    assert str(tmp_path / "tensorboard") in warning and "No space left on device" in warning
    assert "training goes on" in warning and "Traceback" not in err and thread_failures == []

    # Other threads' failures still reach the hook that was there before.
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
    assert [type(error) for error in thread_failures] == [ZeroDivisionError]


def test_a_tensorboard_folder_moved_away_is_one_warning(tmp_path, capfd, thread_failures):
    pytest.importorskip("tensorboard")
    log = TensorBoardLog(tmp_path)
    log.write(RECORD)
    shutil.rmtree(tmp_path / "tensorboard")
    write_until_stopped(log)
    log.close()
    err = capfd.readouterr().err
    (warning,) = warnings_in(err)
    assert "No such file or directory" in warning and f"{tmp_path / 'tensorboard'}/events.out.tfevents." in warning
    assert "Traceback" not in err and thread_failures == []


def test_a_failure_the_writer_thread_meets_after_the_last_write_is_said_at_close(tmp_path, monkeypatch, capfd,
                                                                                thread_failures):
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer

    before = set(threading.enumerate())
    log = TensorBoardLog(tmp_path)
    (writer_thread,) = set(threading.enumerate()) - before
    log.write(RECORD)
    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    log._writer.add_scalar("train/loss", 1.0, global_step=2)  # queued, not flushed: the thread meets it alone
    writer_thread.join(timeout=10)
    assert not writer_thread.is_alive()
    log.close()
    err = capfd.readouterr().err
    assert "could not write the last TensorBoard events" in err and "No space left on device" in err
    assert "Traceback" not in err and thread_failures == []
