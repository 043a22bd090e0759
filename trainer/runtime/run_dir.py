"""One run per output_dir, and its logs in step with its checkpoints.

A fresh start (no `resume`) in an output_dir an earlier run wrote to would otherwise mix with it:
metrics.jsonl appended to, keep_last pruning the new run's checkpoints while the earlier run's
higher-numbered ones stay, `checkpoints/best` and `resume=auto` picking the earlier run's, W&B
continuing its run id. `set_aside_earlier_run` moves what a run writes into
`earlier-runs/<time>/` instead: nothing is deleted, and the new run starts clean. So does a run
resumed from another output_dir's checkpoint, which continues that run here, or from one set aside
under earlier-runs/, which continues that earlier run instead of the current one.

A resumed run redoes the steps after its checkpoint. The log lines a crashed run wrote for them are
moved out of metrics.jsonl and samples.jsonl (`drop_steps_after`, into `*.superseded.jsonl`), so
each step is logged once and report.png draws one curve. The checkpoints it saved after them (a
resume from an older checkpoint than the newest, such as `best`) are set aside too
(`set_aside_checkpoints_after`): left in place, keep_last would count them as the newest and prune
this run's, and resume=auto would pick them.

Two runs at once in one output_dir would do all that to each other: a fresh start moves the running
run's files away under it, and two resume=auto runs overwrite each other's checkpoints. `lock` keeps
a second run out: rank 0 holds an exclusive flock on <output_dir>/.lock for as long as its process
lives (the kernel drops it when the process ends, kill -9 included), and the file names the holder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from trainer.checkpoint.best import BEST, best_checkpoint, mark_best
from trainer.config import RecipeError
from trainer.runtime import distributed

EARLIER = "earlier-runs"
SUPERSEDED = ".superseded.jsonl"
# What a run writes into its output_dir (README, "What a run writes"; eval/ by launch/eval.py, analysis/ by
# launch/analyze.py).
STEP_LOGS = ("metrics.jsonl", "samples.jsonl")
RUN_FILES = (*STEP_LOGS, *(Path(name).with_suffix(SUPERSEDED).name for name in STEP_LOGS), "report.png", "checkpoints",
             "tensorboard", "wandb", "wandb-run-id", "eval", "analysis")
# Not among RUN_FILES: it stays where it is when an earlier run is set aside, and is no sign of one.
LOCK = ".lock"
# flock's answers on a filesystem without file locks (some network and FUSE filesystems).
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_held: dict[Path, BinaryIO] = {}  # output_dir (resolved) -> its locked .lock, open until unlock or the process ends


def nearest_existing(path: Path) -> Path | None:
    """`path` if it exists, else the nearest of its parents that does (None: none of a relative path's)."""
    return next((candidate for candidate in (path, *path.parents) if candidate.exists()), None)


def unwritable(folder: Path) -> str | None:
    """Why a folder could not be made or written at `folder`, or None where it can: checked by making
    (and removing) a folder in its nearest existing ancestor, so a read-only filesystem, another
    user's folder or /proc is found even by root, for whom permission bits say yes. Nothing is left
    behind. For the commands that write their results after minutes of loading (train's dry run,
    eval, export), to refuse before loading instead."""
    existing = nearest_existing(folder)
    if existing is None:
        return None  # nothing exists up to the root of a relative path's filesystem: mkdir will say
    if not existing.is_dir():
        return f"{'it is' if existing == folder else f'{existing} is'} an existing file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        return f"cannot write in {existing}: {error.strerror or error}"
    return None


def lock(output_dir: Path) -> BinaryIO | None:
    """Claim `output_dir` for this run: rank 0 takes an exclusive flock on <output_dir>/.lock (created if
    missing) and writes its PID, host and start time there; another run holding it is a RecipeError that
    names it. Call on every rank, before anything is written there: every rank learns the outcome and
    refuses together (rank 0 alone would leave the others waiting in their next collective). Returns the
    open .lock on rank 0 (None elsewhere, or where the filesystem has no locks: a warning, and the run
    goes on unguarded). Held until `unlock` or the end of the process; a second call in the same process
    returns the lock it holds."""
    handle, refusal = None, None
    if distributed.is_main():
        try:
            handle = _lock_here(output_dir)
        except RecipeError as error:
            refusal = str(error)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise RecipeError(refusal)
    return handle


def unlock(output_dir: Path) -> None:
    """Release this process's lock on `output_dir`, if it holds one."""
    handle = _held.pop(output_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the last descriptor releases the flock


def _lock_here(output_dir: Path) -> BinaryIO | None:
    key = output_dir.resolve()
    if key in _held:
        return _held[key]
    path = output_dir / LOCK
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: until the lock is ours, the file names the run that holds it. Unbuffered:
        # a write the disk refuses is not left in a buffer for close to fail on again.
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
    except OSError as error:
        raise RecipeError(f"cannot create {path} ({error.strerror or error}): output_dir must be a folder this "
                          f"user can write to; choose another output_dir=") from error
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in NO_LOCKS:
            handle.close()
            print(f"warning: cannot lock {path} ({error.strerror or error}): this filesystem has no file locks, "
                  f"so nothing keeps a second run out of {output_dir}; make sure only one run uses it at a time",
                  file=sys.stderr)
            return None
        holder = _holder(handle) if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        handle.close()
        if holder is None:
            raise RecipeError(f"cannot lock {path} ({error.strerror or error}); choose another output_dir=") from error
        raise RecipeError(f"output_dir {output_dir} is in use by another run ({holder}): two runs there would move "
                          f"aside or overwrite each other's files. Wait for that run to end, or choose another "
                          f"output_dir=") from error
    try:
        handle.truncate(0)
        os.pwrite(handle.fileno(), f"pid {os.getpid()} on host {socket.gethostname()}, since "
                                   f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, and a refused run reads "details not written"
    _held[key] = handle
    return handle


def _holder(handle: BinaryIO) -> str:
    """What the holder wrote in .lock (PID, host, start time)."""
    try:
        said = os.pread(handle.fileno(), 300, 0).decode(errors="replace").strip()
    except OSError:
        said = ""
    return said.splitlines()[0] if said else "its pid, host and start time are not written yet"


def prepare(output_dir: Path, resumed_step: int | None, resumed_from: Path | None = None,
            resume_auto: bool = False) -> str | None:
    """Before a run writes: a fresh start (`resumed_step` None) sets an earlier run aside; a resumed
    one sets aside the checkpoints and drops the log lines of the steps it redoes. A run resumed from
    a checkpoint of another output_dir, or of a run set aside under this one's earlier-runs/
    (`resumed_from` elsewhere), continues that run here, as a run of its own: it sets aside what the
    current run left here, as a fresh start does. Returns a note for the log, if anything moved. Call
    on the main rank, after the checkpoint is loaded (what moves here may be the one it was read from).
    `resume_auto`: the run was given resume=auto (the note then does not suggest it)."""
    elsewhere = resumed_from is not None and (not _inside(resumed_from, output_dir)
                                              or _inside(resumed_from, output_dir / EARLIER))
    if resumed_step is None or elsewhere:
        moved_to = set_aside_earlier_run(output_dir)
        started = "this fresh start" if resumed_step is None else f"this run (resumed from {resumed_from})"
        instead = "" if resume_auto else " (resume=auto continues a run instead)"
        return None if moved_to is None else (
            f"note: {output_dir} held an earlier run's files; moved to {moved_to} so that {started} "
            f"does not mix with them{instead}")
    notes = []
    moved_to = set_aside_checkpoints_after(output_dir, resumed_step)
    if moved_to is not None:
        notes.append(f"note: checkpoints after step {resumed_step}, from the run that went on past it, moved to "
                     f"{moved_to}: this run saves its own, and resume=auto, best and keep_last see only those")
    moved = drop_steps_after(output_dir, resumed_step)
    if moved:
        notes.append(f"note: {moved} log line(s) of steps after {resumed_step}, from the run that stopped, moved "
                     f"from metrics.jsonl / samples.jsonl to *{SUPERSEDED}: those steps run again")
    return "\n".join(notes) or None


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def set_aside_earlier_run(output_dir: Path, also: tuple[str, ...] = ()) -> Path | None:
    """Move an earlier run's files (RUN_FILES, and the names in `also`) out of `output_dir` into
    earlier-runs/<UTC time>/; where they went, or None if there were none. Call on the main rank before a
    fresh start writes anything."""
    found = [output_dir / name for name in (*RUN_FILES, *also) if (output_dir / name).exists()]
    if not found:
        return None
    target = _new_earlier_folder(output_dir)
    for path in found:
        shutil.move(str(path), str(target / path.name))
    return target


def set_aside_checkpoints_after(output_dir: Path, step: int) -> Path | None:
    """Move checkpoints/step-<M> for every M > `step`, and a `best` (link or best.json) that names one
    of them, into earlier-runs/<UTC time>/checkpoints/, and point `best` at the best one left. Where
    they went, or None if there were none. A run resumed at `step` redoes the steps after it: the
    checkpoints an earlier continuation saved for them belong to the run it abandons. The link is
    relative, so it still names its checkpoint where both went."""
    checkpoints = output_dir / "checkpoints"
    if not checkpoints.is_dir():
        return None
    later = [path for path in checkpoints.iterdir() if (saved := _checkpoint_step(path)) is not None and saved > step]
    if not later:
        return None
    later_names = {path.name for path in later}
    markers = [marker for marker in (checkpoints / BEST, checkpoints / f"{BEST}.json")
               if _names_one_of(marker, later_names)]
    target = _new_earlier_folder(output_dir) / "checkpoints"
    target.mkdir()
    for path in [*markers, *later]:
        shutil.move(str(path), str(target / path.name))
    if markers and (best := best_checkpoint(checkpoints)) is not None:
        mark_best(best)
    return target.parent


def _checkpoint_step(path: Path) -> int | None:
    return int(path.name.split("-")[1]) if re.fullmatch(r"step-\d+", path.name) else None


def _names_one_of(marker: Path, names: set[str]) -> bool:
    """Whether checkpoints/best (a link) or checkpoints/best.json names a checkpoint in `names`."""
    if marker.is_symlink():
        return Path(os.readlink(marker)).name in names
    if marker.suffix == ".json" and marker.is_file():
        try:
            return json.loads(marker.read_text()).get("best") in names
        except (OSError, ValueError, AttributeError, TypeError):
            return False  # unreadable: left where it is (adapter=...best says so when it is read)
    return False


def _new_earlier_folder(output_dir: Path) -> Path:
    """A new, empty earlier-runs/<UTC time>/."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = output_dir / EARLIER / stamp
    suffix = 1
    while target.exists():  # two set aside within a second
        target = output_dir / EARLIER / f"{stamp}-{suffix}"
        suffix += 1
    target.mkdir(parents=True)
    return target


def drop_steps_after(output_dir: Path, step: int) -> int:
    """Move the lines of metrics.jsonl and samples.jsonl for steps after `step` (the checkpoint a run
    resumes from), and any line cut short, to metrics.superseded.jsonl and samples.superseded.jsonl.
    Returns how many moved."""
    moved = 0
    for name in STEP_LOGS:
        path = output_dir / name
        if not path.is_file():
            continue
        kept, superseded = [], []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            line_step = _step_of(line)
            (superseded if line_step is None or line_step > step else kept).append(line)
        if not superseded:
            continue
        with open(path.with_suffix(SUPERSEDED), "a", encoding="utf-8") as handle:
            handle.writelines(superseded)
        temporary = path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        temporary.replace(path)
        moved += len(superseded)
    return moved


def _step_of(line: str) -> int | None:
    """A log line's step: -1 (kept) where it names none; None (moved) where it is not JSON, a line
    cut short by the crash, which the next line appended would otherwise run into."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else -1
