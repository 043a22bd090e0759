"""Weights & Biases in offline mode: a tiny run with train.report_to: [tensorboard, wandb] leaves an
offline W&B run directory holding every metric, the recipe as the run's config and the sample
generations as tables. The run file is read back record by record (its framing is LevelDB's log
format; each record is a wandb_internal_pb2.Record)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _checkpoints import ONE_THREAD
from conftest import run_cli
from trainer.config import RecipeError
from trainer.recipe_loading import load_recipe

wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32768  # bytes per log block
HEADER = 7  # ":W&B", magic, version; and every record's crc32, length, type


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data, position, pieces = path.read_bytes(), HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if left < HEADER or (length == 0 and kind == 0):  # the rest of the block is padding
            position += left
            continue
        pieces += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def test_offline_wandb_run_holds_metrics_config_and_samples(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "train.max_steps=2", "train.eval_every=2",
                      "train.save_every=2", "train.sample_every=1", "train.sample_count=2", "train.log_every=1",
                      "train.report_to=[tensorboard,wandb]", "train.wandb_project=issue22",
                      "train.wandb_run_name=tiny-offline", f"output_dir={out}"],
                     env=ONE_THREAD, timeout=300)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and f"wandb sync {runs[0]}" in result.stdout
    assert (out / "tensorboard").is_dir()  # both dashboards

    history, config, project = {}, {}, None
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history[int(items["_step"])] = items
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            project, name = record.run.project, record.run.display_name
    assert (project, name) == ("issue22", "tiny-offline")
    assert config["lora"]["r"] == 16 and config["train"]["report_to"] == ["tensorboard", "wandb"]

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        logged = history[record["step"]]
        assert json.loads(logged["train/loss"]) == pytest.approx(record["loss"])
    assert json.loads(history[2]["eval/loss"]) == pytest.approx(metrics[-1]["eval_loss"])

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2):
        table = json.loads((runs[0] / "files" / json.loads(history[step]["samples/path"])).read_text())
        assert table["columns"] == ["step", "question", "input", "reference", "prediction"]
        expected = [row for row in samples if row["step"] == step]
        assert [row[4] for row in table["data"]] == [row["prediction"] for row in expected]


def test_a_resumed_offline_run_says_to_sync_all_its_folders_together(tmp_path):
    """Each start of an offline run writes its own folder; syncing only the last would upload the
    resumed part alone, so the hint names every folder of this run (and no other run's)."""
    from trainer.runtime.dashboards import offline_sync_hint

    first = tmp_path / "offline-run-20261207_100000-abc123"
    first.mkdir()
    (tmp_path / "offline-run-20261207_090000-other1").mkdir()
    assert offline_sync_hint(first, "abc123") == f"{first} (offline: `wandb sync {first}` uploads it)"
    second = tmp_path / "offline-run-20261207_110000-abc123"
    second.mkdir()
    hint = offline_sync_hint(second, "abc123")
    assert hint == (f"{second} (offline, part 2 of this run: `wandb sync {tmp_path}/offline-run-*-abc123` "
                    "uploads all 2 parts as one run)")


def test_report_to_is_validated_and_report_false_still_turns_dashboards_off(tmp_path):
    recipe_path = ROOT / "recipes" / "tiny_alpaca.yaml"
    assert load_recipe(recipe_path).train.report_to == ["tensorboard"]
    with pytest.raises(RecipeError, match="train.report_to"):
        load_recipe(recipe_path, ["train.report_to=[tensorboard,comet]"])
    with pytest.raises(RecipeError, match="train.wandb_mode"):
        load_recipe(recipe_path, ["train.wandb_mode=sometimes"])
    from trainer.runtime.dashboards import Dashboards

    quiet = Dashboards(load_recipe(recipe_path, ["train.report=false", "train.report_to=[tensorboard,wandb]",
                                                 f"output_dir={tmp_path}"]))
    assert not quiet.tensorboard.active and quiet.wandb is None
    quiet.close()


# ------------------------------------------------------------------------------ online without a login


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere wandb looks: no key in the environment, an empty home."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def online_recipe(tmp_path, *overrides):
    return load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["train.report_to=[tensorboard,wandb]",
                                                               "train.wandb_mode=online", f"output_dir={tmp_path}",
                                                               *overrides])


def test_online_wandb_without_credentials_is_refused_before_the_model_loads(tmp_path, no_wandb_login, monkeypatch):
    from trainer.runtime.dashboards import check_wandb_login

    with pytest.raises(RecipeError, match=r"train.wandb_mode=online needs `wandb login` or WANDB_API_KEY; "
                                          r"or use train.wandb_mode=offline \(sync later with `wandb sync`\)"):
        check_wandb_login(online_recipe(tmp_path))
    check_wandb_login(online_recipe(tmp_path, "train.wandb_mode=offline"))  # offline needs no login
    check_wandb_login(online_recipe(tmp_path, "train.report=false"))  # nor dashboards turned off
    (no_wandb_login / ".netrc").write_text("machine example.com login user password secret\n")
    with pytest.raises(RecipeError, match="needs `wandb login`"):  # an entry for another host is none
        check_wandb_login(online_recipe(tmp_path))
    # Where `wandb login` puts the key, or the environment: accepted (wandb.init judges the key).
    (no_wandb_login / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    check_wandb_login(online_recipe(tmp_path))
    # A self-hosted server (`wandb login --host`): its host is in wandb's settings file, its key in netrc.
    (no_wandb_login / ".netrc").write_text("machine wandb.example.com login user password " + "0" * 40 + "\n")
    with pytest.raises(RecipeError, match="needs `wandb login`"):
        check_wandb_login(online_recipe(tmp_path))
    (no_wandb_login / ".config" / "wandb").mkdir(parents=True)
    (no_wandb_login / ".config" / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    check_wandb_login(online_recipe(tmp_path))
    (no_wandb_login / ".netrc").unlink()
    with pytest.raises(RecipeError, match="needs `wandb login`"):
        check_wandb_login(online_recipe(tmp_path))
    (no_wandb_login / ".config" / "wandb" / "settings").write_text("[default]\napi_key = " + "0" * 40 + "\n")
    check_wandb_login(online_recipe(tmp_path))
    (no_wandb_login / ".config" / "wandb" / "settings").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    check_wandb_login(online_recipe(tmp_path))


def test_the_train_command_refuses_online_wandb_without_credentials_in_one_line(tmp_path, no_wandb_login):
    result = run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", "train.report_to=[tensorboard,wandb]",
                      "train.wandb_mode=online", f"output_dir={tmp_path / 'run'}", "--dry-run"],
                     env={**ONE_THREAD, "HOME": str(no_wandb_login)}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: train.wandb_mode=online needs `wandb login` or WANDB_API_KEY" in result.stderr
    assert "trainable" not in result.stdout  # refused before the base loaded


def test_a_wandb_init_that_finds_no_key_is_one_clear_error(tmp_path, monkeypatch):
    """The key check before the model loads cannot see a key wandb then rejects, or no server:
    wandb.init's own error becomes the same one-line message, not a traceback."""
    from trainer.runtime.dashboards import Dashboards

    def no_key(*_, **__):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(RecipeError, match=r"train.wandb_mode=online needs `wandb login` or WANDB_API_KEY; .*"
                                          r"wandb.init said: No API key configured"):
        Dashboards(online_recipe(tmp_path))
    assert not (tmp_path / "wandb-run-id").exists()

    def no_server(*_, **__):
        raise wandb.errors.CommError("Network error (ConnectTimeout)")

    monkeypatch.setattr(wandb, "init", no_server)  # not a login problem: said as what it is
    with pytest.raises(RecipeError, match=r"could not reach the W&B server or was refused \(Network error"):
        Dashboards(online_recipe(tmp_path))


def test_a_wandb_usage_error_about_the_settings_is_not_called_a_missing_login(tmp_path, monkeypatch):
    """wandb raises UsageError for a missing key and for settings it refuses alike: only the first is a login
    problem. A project name W&B refuses is refused by the recipe itself, so a dry run sees it."""
    from trainer.runtime.dashboards import Dashboards

    def refused(*_, **__):
        raise wandb.errors.UsageError("Invalid run id 'a/b': cannot contain characters '/'")

    monkeypatch.setattr(wandb, "init", refused)
    for mode in ("online", "offline"):
        with pytest.raises(RecipeError) as failure:
            Dashboards(online_recipe(tmp_path, f"train.wandb_mode={mode}"))
        assert str(failure.value) == "W&B refused the settings: Invalid run id 'a/b': cannot contain characters '/'"
    with pytest.raises(RecipeError, match=r"train.wandb_project: must be at most 128 characters, none of / \\ # \? % :"):
        online_recipe(tmp_path, "train.wandb_project=team/qlora", "train.wandb_mode=offline")


def test_a_wandb_init_failure_on_rank_0_stops_every_rank(tmp_path, monkeypatch):
    """wandb.init runs on rank 0 only: its failure is shared, so the other ranks stop with it instead of
    waiting for rank 0 in the first collective. Two ranks played in one process, by rank and broadcast."""
    from trainer.runtime import distributed
    from trainer.runtime.dashboards import Dashboards

    def no_server(*_, **__):
        raise wandb.errors.CommError("Network error (ConnectTimeout)")

    shared = []
    monkeypatch.setattr(wandb, "init", no_server)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: shared.append(value) or value)
    with pytest.raises(RecipeError, match="could not reach the W&B server") as failure:
        Dashboards(online_recipe(tmp_path))
    assert shared == [str(failure.value)]
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # rank 1: hears rank 0's outcome
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: shared[0])
    with pytest.raises(RecipeError, match=r"did not start on rank 0, so this rank stops too \(wandb.init could not"):
        Dashboards(online_recipe(tmp_path))
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, source=0: None)  # rank 0 started it
    assert not Dashboards(online_recipe(tmp_path)).wandb.active


def test_a_resumed_run_hides_the_tensorboard_events_the_stopped_run_wrote_after_its_checkpoint(tmp_path):
    """The stopped run logged steps 1-5 and saved at 3; the resumed run logs 4-6 again. TensorBoard must
    show each step once, with the resumed run's values (purge_step)."""
    import time

    from trainer.runtime.dashboards import Dashboards

    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    recipe = load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["train.report_to=[tensorboard]",
                                                                 f"output_dir={tmp_path}"])
    stopped = Dashboards(recipe)
    for step in range(1, 6):
        stopped.write({"step": step, "loss": 1.0})
    stopped.close()
    time.sleep(1.1)  # event files are read in name order, which starts with the second they were opened
    resumed = Dashboards(recipe, resumed_step=3)
    for step in range(4, 7):
        resumed.write({"step": step, "loss": 2.0})
    resumed.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0),
                                                                        (5, 2.0), (6, 2.0)]
