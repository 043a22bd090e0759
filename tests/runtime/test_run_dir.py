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
    (tmp_path / "analysis" / "step-6").mkdir(parents=True)  # launch/analyze.py's, of that run's checkpoint
    moved_to = run_dir.set_aside_earlier_run(tmp_path)
    assert moved_to.parent == tmp_path / run_dir.EARLIER
    assert sorted(p.name for p in moved_to.iterdir()) == ["analysis", "checkpoints", "metrics.jsonl",
                                                          "samples.superseded.jsonl", "wandb-run-id"]
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


def saved_checkpoint(checkpoints, step, eval_loss=None):
    """checkpoints/step-<step> as far as run_dir and best-marking read one: its COMPLETE marker and meta.json."""
    path = checkpoints / f"step-{step}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    (path / "COMPLETE").write_text("")
    return path


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    # Run A saved step-300 (best), 400, 500; run B resumes from best. Left in place, A's step-500 would be
    # taken by resume=auto after B stops at 450, and keep_last would prune B's checkpoints before it.
    checkpoints = tmp_path / "checkpoints"
    for step, loss in ((300, 1.0), (400, 1.5), (500, 2.0)):
        saved_checkpoint(checkpoints, step, loss)
    (checkpoints / "best").symlink_to("step-300", target_is_directory=True)
    write_lines(tmp_path / "metrics.jsonl", [{"step": s} for s in (100, 200, 300, 400, 500)])
    note = run_dir.prepare(tmp_path, 300, checkpoints / "best")
    (moved_to,) = (tmp_path / run_dir.EARLIER).iterdir()
    assert f"checkpoints after step 300, from the run that went on past it, moved to {moved_to}" in note
    assert "2 log line(s)" in note
    assert sorted(p.name for p in (moved_to / "checkpoints").iterdir()) == ["step-400", "step-500"]
    assert (moved_to / "checkpoints" / "step-500" / "COMPLETE").exists()  # moved, not deleted
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-300"]
    assert (checkpoints / "best").resolve() == (checkpoints / "step-300").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", run_dir.EARLIER, "metrics.jsonl",
                                                          "metrics.superseded.jsonl"]
    assert run_dir.prepare(tmp_path, 300, checkpoints / "step-300") is None  # nothing after it any more


def test_a_best_that_names_a_later_checkpoint_goes_with_it_and_best_is_marked_again(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, loss in ((2, 1.5), (4, 1.0), (6, 0.5)):
        saved_checkpoint(checkpoints, step, loss)
    (checkpoints / "best").symlink_to("step-6", target_is_directory=True)
    run_dir.prepare(tmp_path, 2, checkpoints / "step-2")
    (moved_to,) = (tmp_path / run_dir.EARLIER).iterdir()
    # The relative link went with its checkpoint and still names it; best here is the best one left.
    assert (moved_to / "checkpoints" / "best").resolve() == (moved_to / "checkpoints" / "step-6").resolve()
    assert (checkpoints / "best").resolve() == (checkpoints / "step-2").resolve()
    # Where symlinks are not allowed, best.json names the checkpoint: it goes with it too.
    saved_checkpoint(checkpoints, 8, 0.1)
    (checkpoints / "best").unlink()
    (checkpoints / "best.json").write_text(json.dumps({"best": "step-8", "eval_loss": 0.1}))
    run_dir.prepare(tmp_path, 2, checkpoints / "step-2")
    (second,) = set((tmp_path / run_dir.EARLIER).iterdir()) - {moved_to}
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["best.json", "step-8"]
    assert (checkpoints / "best").resolve() == (checkpoints / "step-2").resolve()


def test_a_resume_from_a_run_set_aside_under_earlier_runs_sets_the_current_run_aside(tmp_path):
    # Resuming from earlier-runs/ continues that earlier run: the current run's checkpoints (higher
    # steps here) and logs must not mix with it. The checkpoint resumed from stays where it is.
    earlier = tmp_path / run_dir.EARLIER / "20260101-000000"
    saved_checkpoint(earlier / "checkpoints", 4)
    saved_checkpoint(tmp_path / "checkpoints", 8)
    write_lines(tmp_path / "metrics.jsonl", [{"step": s} for s in range(1, 9)])
    note = run_dir.prepare(tmp_path, 4, earlier / "checkpoints" / "step-4")
    assert "earlier run's files" in note and "resumed from" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.EARLIER]
    (current,) = set((tmp_path / run_dir.EARLIER).iterdir()) - {earlier}
    assert (current / "checkpoints" / "step-8" / "COMPLETE").exists() and (current / "metrics.jsonl").exists()
    assert (earlier / "checkpoints" / "step-4" / "COMPLETE").exists()


def test_a_fresh_start_under_resume_auto_does_not_suggest_resume_auto(tmp_path):
    # resume=auto found no complete checkpoint (an interrupted first save): the run starts fresh, and its
    # note must not tell the user to pass the resume=auto they passed.
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)  # no COMPLETE marker
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1}])
    note = run_dir.prepare(tmp_path, None, resume_auto=True)
    assert "held an earlier run's files" in note and "so that this fresh start does not mix with them" in note
    assert "resume=auto" not in note
    write_lines(tmp_path / "metrics.jsonl", [{"step": 1}])
    assert "(resume=auto continues a run instead)" in run_dir.prepare(tmp_path, None)  # no resume asked: the hint
