"""One run per output_dir at a time: rank 0 holds an flock on <output_dir>/.lock for its process's
life; a second run there is refused with one message naming the holder, and a killed holder frees it."""
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from trainer import cli
from trainer.config import RecipeError
from trainer.runtime import run_dir

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from trainer.runtime import run_dir
    run_dir.lock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/out; killed at the end."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_second_run_is_refused_while_the_first_holds_the_lock_and_not_after_it_is_killed(tmp_path, holder):
    output_dir = tmp_path / "out"
    with pytest.raises(RecipeError) as refused:
        run_dir.lock(output_dir)
    message = str(refused.value)
    assert "\n" not in message and str(output_dir) in message and "in use by another run" in message
    assert f"pid {holder.pid} on host {socket.gethostname()}, since " in message and " UTC" in message
    assert "choose another output_dir" in message
    assert isinstance(refused.value, cli.KNOWN_ERRORS)  # launch/train.py: this one line, exit 2, no traceback
    # kill -9: no clean-up runs, and the kernel frees the lock with the process.
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    handle = run_dir.lock(output_dir)
    try:
        assert handle is not None and (output_dir / ".lock").read_text().startswith(f"pid {os.getpid()} on host ")
        assert run_dir.lock(output_dir) is handle  # a second call in this process returns the lock it holds
    finally:
        run_dir.unlock(output_dir)
    assert handle.closed


def test_the_train_command_refuses_a_held_output_dir_in_one_line(tmp_path, holder, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.run_script(lambda: run_dir.lock(tmp_path / "out"), [])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir ") and "\n" not in err and "Traceback" not in err


def test_an_unlocked_output_dir_is_free_for_another_process(tmp_path):
    output_dir = tmp_path / "out"
    run_dir.lock(output_dir)
    run_dir.unlock(output_dir)
    result = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", ""), str(output_dir)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "locked", result.stderr


def test_the_lock_file_is_no_earlier_run_and_stays_where_it_is(tmp_path):
    run_dir.lock(tmp_path)
    try:
        assert run_dir.set_aside_earlier_run(tmp_path) is None  # only .lock: nothing to set aside
        assert run_dir.prepare(tmp_path, None) is None
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
        moved_to = run_dir.set_aside_earlier_run(tmp_path)
        assert [p.name for p in moved_to.iterdir()] == ["metrics.jsonl"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", run_dir.EARLIER]
    finally:
        run_dir.unlock(tmp_path)


def test_a_filesystem_without_locks_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_locks)
    assert run_dir.lock(tmp_path / "out") is None
    err = capsys.readouterr().err
    assert err.count("warning: cannot lock") == 1 and "No locks available" in err and "only one run" in err


def test_an_output_dir_that_cannot_be_created_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError, match="cannot create .*choose another output_dir"):
        run_dir.lock(tmp_path / "file" / "out")


def test_every_rank_refuses_with_rank_0_and_only_rank_0_locks(tmp_path, holder, monkeypatch):
    """Two ranks played in one process, by rank and broadcast: rank 1 hears rank 0's outcome instead of
    waiting for it in the next collective."""
    from trainer.runtime import distributed

    shared = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: shared.append(value) or value)
    with pytest.raises(RecipeError, match="in use by another run") as refused:
        run_dir.lock(tmp_path / "out")
    assert shared == [str(refused.value)]
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: shared[0])
    with pytest.raises(RecipeError, match="in use by another run"):
        run_dir.lock(tmp_path / "out")
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: None)  # rank 0 took it
    assert run_dir.lock(tmp_path / "other") is None and not (tmp_path / "other").exists()


def test_a_holder_that_could_not_write_its_details_still_holds_the_lock(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    output_dir = tmp_path / "out"
    run_dir.lock(output_dir)
    try:
        result = subprocess.run([sys.executable, "-c", HOLD, str(output_dir)], cwd=ROOT, capture_output=True,
                                text=True)
        assert result.returncode == 1 and "pid, host and start time are not written yet" in result.stderr
    finally:
        run_dir.unlock(output_dir)
