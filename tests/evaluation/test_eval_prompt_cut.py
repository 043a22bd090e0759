"""Eval's prompts within data.max_seq_len: the prompts eval.max_new_tokens leaves room for are cut as
training cuts them, with a note saying how many and by how much; cut to almost nothing, refused on
every rank before the base loads. And an out= that names an existing file, refused on every rank
before anything is loaded (rank 0's mkdir used to fail alone, after the evaluation, the others
waiting at the barrier)."""
from __future__ import annotations

import json

import pytest
import torch

from _checkpoints import ONE_THREAD, one_thread, tiny_recipe
from conftest import free_port, run_cli
from trainer.config import RecipeError
from trainer.evaluation import eval_command
from trainer.evaluation.eval_command import EvalOptions, eval_prompts, evaluation_rows, run_eval
from trainer.evaluation.generate import prompt_ids
from trainer.model.base import load_tokenizer, resolve_base

MAX_SEQ_LEN = 160  # tiny_alpaca.yaml's data.max_seq_len


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def tokenizer_and_rows(tiny_base):
    recipe = tiny_recipe()
    assert recipe.data.max_seq_len == MAX_SEQ_LEN
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    rows, _ = evaluation_rows(recipe, tokenizer, None, 32)
    return tokenizer, rows


class Stop(Exception):
    """Raised in place of the base's loading: what ran before it is what a test looks at."""


def in_process(monkeypatch, rank: int = 0, load_model: bool = False) -> None:
    """run_eval in pytest's process as rank `rank` of the ranks that compute the same rows: no process
    group (the world of one it would start stays out of pytest), and unless `load_model`, Stop where
    the base would load."""
    monkeypatch.setattr(eval_command.distributed, "init", lambda: torch.device("cpu"))
    monkeypatch.setattr(eval_command.distributed, "rank", lambda: rank)
    if not load_model:
        def no_base(*args, **kwargs):
            raise Stop

        monkeypatch.setattr(eval_command, "load_adapted_model", no_base)


def test_prompts_that_fit_are_whole_and_unnoted(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    prompts, note = eval_prompts(tokenizer, rows, tiny_recipe().data, 8)
    assert note is None
    assert prompts == [prompt_ids(tokenizer, row, "alpaca") for row in rows]


def test_cut_prompts_are_noted_with_how_many_by_how_much_and_what_to_change(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    max_new_tokens = 105  # room for some prompts whole: the others keep Alpaca's markup and part of their text
    max_prompt = MAX_SEQ_LEN - max_new_tokens
    prompts, note = eval_prompts(tokenizer, rows, tiny_recipe().data, max_new_tokens)
    assert prompts == [prompt_ids(tokenizer, row, "alpaca", max_prompt) for row in rows]  # cut as before
    whole = [len(prompt_ids(tokenizer, row, "alpaca")) for row in rows]
    cut = [length - max_prompt for length in whole if length > max_prompt]
    assert 0 < len(cut) < len(rows)
    assert note == (f"note: {len(cut)} of {len(rows)} prompts cut from their start, by up to {max(cut)} tokens, to "
                    f"{max_prompt} tokens (eval.max_new_tokens=105 within data.max_seq_len=160); raise "
                    f"data.max_seq_len or lower eval.max_new_tokens to keep more of them")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("max_new_tokens", [MAX_SEQ_LEN, 500, 140])
def test_prompts_cut_to_almost_nothing_are_refused(tokenizer_and_rows, template, max_new_tokens):
    # max_new_tokens = max_seq_len left an Alpaca prompt its last token; under the chat template the
    # markup is never cut, so what is left is markup alone, and that must not count as the prompt.
    tokenizer, rows = tokenizer_and_rows
    data = tiny_recipe(f"data.template={template}").data
    with pytest.raises(RecipeError, match=f"^eval.max_new_tokens={max_new_tokens} leaves .* data.max_seq_len=160 "
                                          f"tokens: .* lower eval.max_new_tokens or raise data.max_seq_len$"):
        eval_prompts(tokenizer, rows, data, max_new_tokens)


def test_prompts_longer_than_training_saw_and_a_few_cut_deep_are_noted_not_refused(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    data = tiny_recipe().data
    long = [{"instruction": f"Repeat the word {word}: " + f"{word} " * 300, "input": "", "output": word}
            for word in ("alpha", "beta", "gamma", "delta", "epsilon")]
    # Training cut these to fit 160 tokens too: 8 new tokens leave them about what training kept.
    _, note = eval_prompts(tokenizer, long, data, 8)
    assert note.startswith(f"note: {len(long)} of {len(long)} prompts cut")
    # Half the room left: the long prompts keep a third of what training kept, the others are whole.
    mixed = rows[:10] + long[:4]
    _, note = eval_prompts(tokenizer, mixed, data, 100)
    assert note.startswith(f"note: {sum(len(prompt_ids(tokenizer, r, 'alpaca')) > 60 for r in mixed)} of 14 prompts")
    with pytest.raises(RecipeError, match="5 of 10 prompts would keep less than half their text"):
        eval_prompts(tokenizer, rows[:5] + long, data, 100)


def test_run_eval_refuses_starved_prompts_on_every_rank_before_the_base_loads(monkeypatch, tiny_base):
    for rank in (0, 1):
        in_process(monkeypatch, rank)
        with pytest.raises(RecipeError, match="eval.max_new_tokens=160 leaves a prompt 1 of data.max_seq_len=160"):
            run_eval(tiny_recipe(), EvalOptions(adapter="none", max_new_tokens=160, max_rows=8))


def test_run_eval_notes_cut_prompts_on_rank_0_alone(monkeypatch, capsys, tiny_base):
    in_process(monkeypatch, rank=1)
    with pytest.raises(Stop):
        run_eval(tiny_recipe(), EvalOptions(adapter="none", max_new_tokens=105, max_rows=8))
    assert "prompts cut" not in capsys.readouterr().out
    in_process(monkeypatch, rank=0)
    with pytest.raises(Stop):
        run_eval(tiny_recipe(), EvalOptions(adapter="none", max_new_tokens=105, max_rows=8))
    assert capsys.readouterr().out.count("note: 3 of 8 prompts cut from their start") == 1


def test_run_eval_with_cut_prompts_still_scores_them(monkeypatch, capsys, tmp_path, tiny_base):
    in_process(monkeypatch, load_model=True)
    summary = run_eval(tiny_recipe(), EvalOptions(adapter="none", out=str(tmp_path), max_new_tokens=105, max_rows=4,
                                                  batch_size=4, loss=False))
    out = capsys.readouterr().out
    assert out.count("note: 2 of 4 prompts cut") == 1 and summary["rows"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["options"]["max_new_tokens"] == 105


def test_out_naming_an_existing_file_is_refused_on_every_rank_before_anything_loads(monkeypatch, tmp_path):
    def no_start():
        raise AssertionError("the process group started: out= must be checked before")

    monkeypatch.setattr(eval_command.distributed, "init", no_start)
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    for rank in (0, 1):
        monkeypatch.setattr(eval_command.distributed, "rank", lambda: rank)
        with pytest.raises(RecipeError, match=f"^out={existing} names an existing file; give out=<directory>"):
            run_eval(tiny_recipe(), EvalOptions(adapter="none", out=str(existing)))
    with pytest.raises(RecipeError, match=f"^out={existing / 'eval'} lies under {existing}, an existing file"):
        run_eval(tiny_recipe(), EvalOptions(adapter="none", out=str(existing / "eval")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval").write_text("")  # the default out=<output_dir>/eval/no-adapter lies under it
    with pytest.raises(RecipeError, match="^the default out=.*/run/eval/no-adapter lies under"):
        run_eval(tiny_recipe(f"output_dir={tmp_path / 'run'}"), EvalOptions(adapter="none"))
    assert existing.read_text() == "{}"


def test_out_where_this_user_cannot_write_is_refused_before_anything_loads(monkeypatch, unwritable_dir):
    monkeypatch.setattr(eval_command.distributed, "init", lambda: pytest.fail("the process group started"))
    out = unwritable_dir / "eval"
    with pytest.raises(RecipeError, match=f"^out={out}: cannot write in .*; give out=<directory> this user can"):
        run_eval(tiny_recipe(), EvalOptions(adapter="none", out=str(out)))


@pytest.mark.distributed
@pytest.mark.slow
def test_out_naming_an_existing_file_ends_both_ranks(tmp_path, tiny_base):
    existing = tmp_path / "results"
    existing.write_text("")
    result = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/eval.py",
                      "recipes/tiny_alpaca.yaml", "adapter=none", f"out={existing}"], env=ONE_THREAD, check=False,
                     timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    for prefix in ("error: ", "error (rank 1): "):
        assert f"{prefix}out={existing} names an existing file" in result.stderr
    assert "Traceback" not in result.stderr
