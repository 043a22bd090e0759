"""The checkpoints folder as a whole: which checkpoints are complete (their COMPLETE marker, written
last), which one is the best (the lowest held-out loss) and the checkpoints/best link to it, and
pruning all but the newest `train.keep_last` and the best."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
BEST = "best"


def mark_best_and_prune(newest: Path, keep_last: int | None) -> None:
    """After `newest` is in place: point checkpoints/best at the best checkpoint, then remove all
    but the newest `keep_last` and that best one. The link moves first, so it never dangles."""
    checkpoints = newest.parent
    best = best_checkpoint(checkpoints)
    if best is not None:
        mark_best(best)
    if not keep_last:
        return
    for old in complete_checkpoints(checkpoints)[:-keep_last]:
        if old not in (newest, best):
            shutil.rmtree(old, ignore_errors=True)


def saved_eval_loss(checkpoint: Path) -> float | None:
    """The held-out loss recorded in a checkpoint's meta.json; None if it was not evaluated there."""
    try:
        loss = json.loads((checkpoint / "meta.json").read_text()).get("eval_loss")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the lowest held-out loss (the earliest on a tie); None when no
    checkpoint was saved at an evaluation step."""
    scored = [(loss, int(path.name.split("-")[1]), path) for path in complete_checkpoints(checkpoints)
              if (loss := saved_eval_loss(path)) is not None]
    return min(scored)[2] if scored else None


def mark_best(checkpoint: Path) -> None:
    """Point checkpoints/best at `checkpoint`: a relative symlink (the run directory can move),
    replaced atomically so a reader sees the old target or the new one. Where symlinks are not
    allowed, checkpoints/best.json names it instead."""
    checkpoints = checkpoint.parent
    temporary = checkpoints / f".tmp-{BEST}-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    if (checkpoints / BEST).is_dir() and not (checkpoints / BEST).is_symlink():
        # A copy made by a tool that followed the link (cp -r, rsync -L): stale, and in the way.
        print(f"note: {checkpoints / BEST} was a directory (a copied link), not a link; replacing it", flush=True)
        shutil.rmtree(checkpoints / BEST)
    try:
        os.symlink(checkpoint.name, temporary, target_is_directory=True)
        os.replace(temporary, checkpoints / BEST)
    except OSError:
        temporary.unlink(missing_ok=True)
        if (checkpoints / BEST).is_symlink():  # an older link would soon dangle
            (checkpoints / BEST).unlink()
        note = {"best": checkpoint.name, "eval_loss": saved_eval_loss(checkpoint)}
        temporary.write_text(json.dumps(note, indent=2) + "\n")
        os.replace(temporary, checkpoints / f"{BEST}.json")
        return
    (checkpoints / f"{BEST}.json").unlink(missing_ok=True)  # left by an earlier fallback


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints (with their COMPLETE marker), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))
