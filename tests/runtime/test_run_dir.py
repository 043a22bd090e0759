"""One run per output_dir: a fresh start sets an earlier run aside; a resume drops the log lines of
the steps it redoes."""
import json

from trainer.runtime import run_dir


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_a_fresh_start_moves_an_earlier_runs_files_aside_and_leaves_the_rest(tmp_path):
    (tmp_path / "checkpoints" / "step-6").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-6" / "COMPLETE").write_text("")
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}])
    (tmp_path / "wandb-run-id").write_text("abc\n")
    write_lines(tmp_path / "samples.superseded.jsonl", [{"step": 5}])  # from a resume of that run
    (tmp_path / "notes.txt").write_text("mine")  # not something a run writes: stays
    moved_to = run_dir.set_aside_earlier_run(tmp_path)
    assert moved_to.parent == tmp_path / run_dir.EARLIER
    assert sorted(p.name for p in moved_to.iterdir()) == ["checkpoints", "metrics.jsonl", "samples.superseded.jsonl",
                                                          "wandb-run-id"]
    assert (moved_to / "checkpoints" / "step-6" / "COMPLETE").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.EARLIER, "notes.txt"]
    # A second fresh start within the same second gets a folder of its own.
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 3.0}])
    again = run_dir.set_aside_earlier_run(tmp_path)
    assert again != moved_to and (again / "metrics.jsonl").exists() and (moved_to / "metrics.jsonl").exists()


def test_nothing_to_set_aside_in_an_empty_or_new_output_dir(tmp_path):
    assert run_dir.set_aside_earlier_run(tmp_path / "new") is None
    assert run_dir.set_aside_earlier_run(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_resume_moves_the_lines_of_the_steps_it_redoes(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 8)])
    write_lines(tmp_path / "samples.jsonl", [{"step": 3, "prediction": "a"}, {"step": 6, "prediction": "b"}])
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "lo')  # the crash cut the last line short
    assert run_dir.drop_steps_after(tmp_path, 4) == 5
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded[:3]] == [5, 6, 7] and superseded[3] == '{"step": 8, "lo'
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [3]
    assert json.loads((tmp_path / "samples.superseded.jsonl").read_text())["step"] == 6
    assert run_dir.drop_steps_after(tmp_path, 4) == 0  # already in step


def test_a_resume_with_nothing_after_its_step_changes_nothing(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1}, {"note": "no step"}, {"step": 2}])
    before = (tmp_path / "metrics.jsonl").read_text()
    assert run_dir.drop_steps_after(tmp_path, 2) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "metrics.superseded.jsonl").exists()


def test_a_resume_from_another_output_dirs_checkpoint_sets_this_ones_earlier_run_aside(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    (there / "checkpoints" / "step-4").mkdir(parents=True)
    (here / "checkpoints" / "step-8").mkdir(parents=True)  # an unrelated run's, with higher steps
    write_lines(here / "metrics.jsonl", [{"step": s} for s in range(1, 9)])
    note = run_dir.prepare(here, 4, there / "checkpoints" / "step-4")
    assert "earlier run's files" in note and "resumed from" in note
    assert sorted(p.name for p in here.iterdir()) == [run_dir.EARLIER]
    # Its own checkpoint (a relative path, or through a link, is still this output_dir): lines dropped, not set aside.
    write_lines(here / "metrics.jsonl", [{"step": s} for s in range(1, 9)])
    (here / "checkpoints" / "step-4").mkdir(parents=True)
    (tmp_path / "link").symlink_to(here)
    note = run_dir.prepare(here, 4, tmp_path / "link" / "checkpoints" / "step-4")
    assert "4 log line(s)" in note
    assert [json.loads(line)["step"] for line in (here / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert run_dir.prepare(tmp_path / "new", 4, there / "checkpoints" / "step-4") is None  # nothing here yet
