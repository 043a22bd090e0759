"""Weights & Biases for a training run, beside TensorBoard: `train.report_to: [tensorboard, wandb]`.

    train.wandb_project: qlora-trainer   train.wandb_run_name: null (output_dir's name)
    train.wandb_mode: offline            (online streams to wandb.ai; needs `wandb login`)

Rank 0 logs every metrics.jsonl record under the TensorBoard tags (train/loss, eval/loss, ...),
the resolved recipe as the run's config, and each round of sample generations as a table
(step, question, input, reference, prediction). Offline, the run is written under
<output_dir>/wandb/offline-run-*/ with no network; `wandb sync <that dir>` uploads it later.
A resumed run (same output_dir) continues the same W&B run (offline: a folder per start, synced
together); the steps it redoes keep there the values the stopped run sent (W&B drops a step below one
it has), while TensorBoard shows the new ones (TensorBoardLog's resumed_step). wandb is optional
(`pip install wandb`, or `.[report]`): without it, a note and nothing else. Online without
credentials is refused in setup, before the model loads (check_wandb_login), with one message; a
wandb.init that fails later stops every rank.
"""
from __future__ import annotations

import configparser
import importlib.util
import netrc
import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from trainer.runtime import distributed
from trainer.config import Recipe, RecipeError
from trainer.runtime.report import SKIPPED, TAGS, samples_markdown

SAMPLE_COLUMNS = ["step", "question", "input", "reference", "prediction"]
RUN_ID_FILE = "wandb-run-id"
NO_LOGIN = ("train.wandb_mode=online needs `wandb login` or WANDB_API_KEY; or use train.wandb_mode=offline "
            "(sync later with `wandb sync`)")
DEFAULT_BASE_URL = "https://api.wandb.ai"


def has_wandb_credentials() -> bool:
    """Whether wandb.init would find credentials without asking, read where wandb reads them, with no
    network: WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE; an api_key in wandb's settings file
    (WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings); else an entry in the netrc file (NETRC,
    else ~/.netrc, else ~/_netrc) for the server's host (WANDB_BASE_URL, else the settings file's
    base_url, which `wandb login --host` writes, else api.wandb.ai). Whether the key is valid, only
    wandb.init can tell."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = configparser.ConfigParser()
    directory = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        settings.read(directory / "settings")
    except configparser.Error:
        return True  # unreadable here: left to wandb.init
    saved = settings["default"] if settings.has_section("default") else {}
    if saved.get("api_key"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or saved.get("base_url") or DEFAULT_BASE_URL).netloc
    if os.environ.get("NETRC"):
        candidates = [Path(os.environ["NETRC"]).expanduser()]
    else:
        candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return netrc.netrc(str(path)).authenticators(host) is not None
        except (netrc.NetrcParseError, OSError):
            return True  # unreadable here: left to wandb.init, whose failure is reported as NO_LOGIN
    return False


def check_wandb_login(recipe: Recipe) -> None:
    """Refuse train.wandb_mode=online without W&B credentials on rank 0 (the rank that logs), on every
    rank alike, before the model loads; a dry run checks it too."""
    train = recipe.train
    if not (train.report and "wandb" in train.report_to and train.wandb_mode == "online"):
        return  # the same recipe on every rank: all return here, no collective
    # Without wandb installed, WandbLog only prints a note.
    missing = distributed.is_main() and importlib.util.find_spec("wandb") is not None and not has_wandb_credentials()
    if distributed.broadcast_object(missing):
        raise RecipeError(NO_LOGIN)


def is_missing_login(error: Exception) -> bool:
    """Whether a wandb UsageError is about missing credentials ("No API key configured. Use `wandb login`"),
    not about the settings (an invalid project name is a UsageError too)."""
    return re.search(r"\bapi[ _]key\b|\blog ?in\b", str(error), re.IGNORECASE) is not None


def offline_sync_hint(directory: Path, run_id: str) -> str:
    """Where an offline run is and how to upload it. Each start of a resumed run writes its own
    offline-run-<time>-<id> folder; one `wandb sync` given all of them uploads them as one run, in
    order of start time (wandb >= 0.30; syncing only a later folder would leave out the steps before)."""
    parts = sorted(directory.parent.glob(f"offline-run-*-{run_id}"))
    if len(parts) <= 1:
        return f"{directory} (offline: `wandb sync {directory}` uploads it)"
    return (f"{directory} (offline, part {len(parts)} of this run: "
            f"`wandb sync {directory.parent}/offline-run-*-{run_id}` uploads all {len(parts)} parts as one run)")


class WandbLog:
    def __init__(self, recipe: Recipe):
        self._run = None
        if not distributed.is_main():
            return
        try:
            import wandb
        except ImportError:
            print("note: wandb is not installed (pip install wandb, or .[report]); train.report_to lists "
                  "wandb, so nothing goes to Weights & Biases")
            return
        output_dir = Path(recipe.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file = output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        try:
            self._run = wandb.init(
                project=recipe.train.wandb_project, name=recipe.train.wandb_run_name or output_dir.resolve().name,
                mode=recipe.train.wandb_mode, dir=str(output_dir), config=recipe.to_dict(), id=run_id,
                resume="allow",
                # Our own line says where the run is; wandb's banner, console capture and summary stay out.
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        except (wandb.errors.UsageError, wandb.errors.CommError) as error:  # CommError: AuthenticationError too
            said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if isinstance(error, wandb.errors.AuthenticationError) or is_missing_login(error):  # no key, or rejected
                raise RecipeError(f"{NO_LOGIN}. wandb.init said: {said}") from error
            if isinstance(error, wandb.errors.UsageError):  # the settings themselves (project name, ...)
                raise RecipeError(f"W&B refused the settings: {said}") from error
            raise RecipeError(f"wandb.init could not reach the W&B server or was refused ({said}): check the network, "
                              f"train.wandb_project and your entity, or use train.wandb_mode=offline") from error
        id_file.write_text(run_id + "\n")
        self.directory = Path(self._run.dir).parent
        where = self._run.url if recipe.train.wandb_mode == "online" else offline_sync_hint(self.directory, run_id)
        print(f"wandb: run {self._run.name} in project {recipe.train.wandb_project}: {where}")

    @property
    def active(self) -> bool:
        return self._run is not None

    def write(self, record: dict) -> None:
        if self._run is None:
            return
        values = {TAGS.get(key, f"train/{key}"): value for key, value in record.items()
                  if key not in SKIPPED and not isinstance(value, bool) and isinstance(value, (int, float))}
        self._run.log(values, step=record["step"])

    def write_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        if self._run is None:
            return
        import wandb

        rows = [[step, s["instruction"], s.get("input", ""), s["reference"], s["prediction"]] for s in samples]
        self._run.log({"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class Dashboards:
    """The dashboards `train.report_to` names (none with `train.report: false`), written together.
    Create on every rank: rank 0 writes them. `resumed_step`: the checkpoint's step a resumed run
    continues from (0 for a fresh start)."""

    def __init__(self, recipe: Recipe, resumed_step: int = 0):
        from trainer.runtime.report import TensorBoardLog

        wanted = recipe.train.report_to if recipe.train.report else []
        self.tensorboard = TensorBoardLog(Path(recipe.output_dir), "tensorboard" in wanted, resumed_step)
        self.wandb = None
        if "wandb" not in wanted:
            return  # the same recipe on every rank: all return here, no collective
        failure = None
        try:
            self.wandb = WandbLog(recipe)  # wandb.init runs on rank 0 only
        except Exception as error:  # noqa: BLE001  (whatever stops rank 0 here must stop the other ranks too)
            failure = error
        # Every rank learns whether wandb.init failed: the others would otherwise go on into the first
        # collective and wait there for rank 0, which has stopped.
        said = distributed.broadcast_object(None if failure is None else (str(failure) or type(failure).__name__))
        if said is None:
            return
        self.tensorboard.close()
        if failure is not None:
            raise failure
        raise RecipeError(f"Weights & Biases did not start on rank 0, so this rank stops too ({said})")

    def write(self, record: dict) -> None:
        self.tensorboard.write(record)
        if self.wandb is not None:
            self.wandb.write(record)

    def write_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self.tensorboard.write_text("samples", samples_markdown(samples), step)
        if self.wandb is not None:
            self.wandb.write_samples(step, samples)

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()
