"""Generation-based evaluation: batched greedy decoding, the same answers and held-out loss on 1 and 2
ZeRO-3 ranks with a 4-bit base, the files and table it writes, and adapters trained on another base
refused."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from _checkpoints import ONE_THREAD, make_checkpoint, one_thread, our_model, tiny_recipe
from conftest import free_port, run_cli
from trainer.checkpoint.reading import AdapterMismatchError, check_adapter, held_out_split_differences, resolve_adapter
from trainer.checkpoint.saving import CheckpointError
from trainer.checkpoint.fingerprint import base_fingerprint
from trainer.config import RecipeError
from trainer.data.pipeline import build_datasets
from trainer.evaluation.eval_command import (EvalOptions, default_out, evaluation_rows, replaced_note, run_eval,
                                           write_metrics, write_results)
from trainer.evaluation.held_out_loss import evaluate_loss
from trainer.evaluation.generate import decoding_mask, generate, greedy_batch, prompt_ids, stop_ids
from trainer.loss import CausalLMLoss
from trainer.model.base import load_tokenizer, resolve_base
from trainer.options import parse_options, split_argv

EVAL_ARGS = ["eval.max_rows=24", "eval.batch_size=8", "eval.max_new_tokens=8", "deepspeed.zero_stage=3"]

@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model_and_tokenizer(adapter):
    recipe = tiny_recipe()
    return our_model(recipe, adapter), load_tokenizer(resolve_base(recipe), recipe)


def test_batched_left_padded_decoding_equals_one_prompt_at_a_time_and_a_plain_reforward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    recipe = tiny_recipe()
    rows, _ = evaluation_rows(recipe, tokenizer, None, 6)
    prompts = [prompt_ids(tokenizer, row, "alpaca") for row in rows]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    assert all(p[0] == tokenizer.bos_token_id for p in prompts)
    cpu = torch.device("cpu")
    batched = greedy_batch(model, prompts, 6, tokenizer.eos_token_id, tokenizer.pad_token_id, cpu)
    alone = [greedy_batch(model, [p], 6, tokenizer.eos_token_id, tokenizer.pad_token_id, cpu)[0] for p in prompts]
    assert batched == alone

    def reforward(prompt: list[int]) -> list[int]:  # no cache, no padding: the definition of greedy
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        return ids[len(prompt):]

    assert batched == [reforward(p) for p in prompts]
    texts = generate(model, tokenizer, prompts, 6, 4, cpu)
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in batched]


def test_left_padded_mask_has_no_fully_masked_row_and_padding_never_reaches_a_real_token():
    real = torch.tensor([[False, False, True, True], [True, True, True, True], [False, False, False, True]])
    mask = decoding_mask(real, 4)[:, 0]
    assert mask.any(-1).all()  # CUDA SDPA returns NaN for a row with nothing to attend to
    assert not (mask & ~real[:, None, :] & real[:, :, None]).any()  # real queries see only real keys
    torch.testing.assert_close(mask[0, :2], torch.tensor([[True, False, False, False], [False, True, False, False]]))
    assert torch.equal(mask[1], torch.ones(4, 4, dtype=torch.bool).tril())
    step = decoding_mask(torch.cat([real, torch.ones(3, 1, dtype=torch.bool)], 1), 1)  # one new token
    assert step.shape == (3, 1, 1, 5) and torch.equal(step[:, 0, 0], torch.cat([real, torch.ones(3, 1, dtype=torch.bool)], 1))


def test_the_model_gets_no_fully_masked_row_and_decodes_the_same_through_the_loss_wrapper(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [[tokenizer.bos_token_id, 45, 67, 89, 12], [tokenizer.bos_token_id, 33], [tokenizer.bos_token_id, 7, 8]]
    masks = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    try:
        cpu = torch.device("cpu")
        direct = greedy_batch(model, prompts, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, cpu)
        wrapped = greedy_batch(CausalLMLoss(model), prompts, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, cpu)
    finally:
        hook.remove()
    assert direct == wrapped
    assert masks and all(mask.dim() == 4 and mask.any(-1).all() for mask in masks)


def test_each_row_stops_at_its_own_eos_and_the_batch_once_every_row_has(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bos, eos, pad, cpu = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu")
    prompts = [[bos, 7], [bos, 33, 8], [bos, 45, 67, 89], [bos, 45, 67, 89, 12]]  # ascending: generate keeps the order
    free = greedy_batch(model, prompts, 8, eos, pad, cpu)
    assert all(len(tokens) == 8 for tokens in free), free  # the tiny model emits no EOS of its own here
    # The real model's logits, but EOS made the greedy choice of row i at its eos_at[i]-th new token:
    # at the first (row 3), mid-answer (rows 0 and 2), and the last before decoding stops (row 1).
    eos_at = [2, 5, 3, 0]
    forward_passes = []

    def force_eos(module, args, output):
        for row, step in enumerate(eos_at):
            if step == len(forward_passes):
                output.logits[row, -1, eos] = output.logits[row, -1].max() + 1
        forward_passes.append(len(forward_passes))
        return output

    hook = model.register_forward_hook(force_eos)
    try:
        stopped = greedy_batch(model, prompts, 8, eos, pad, cpu)
        passes = len(forward_passes)
        forward_passes.clear()
        texts = generate(model, tokenizer, prompts, 8, len(prompts), cpu)
    finally:
        hook.remove()
    # Exactly the tokens before EOS; the rows still going are unaffected by those that stopped.
    assert stopped == [tokens[:step] for tokens, step in zip(free, eos_at)]
    assert passes == max(eos_at) + 1 < 8  # no forward pass once every row is done
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in stopped]


def test_every_stop_token_of_the_model_ends_an_answer(model_and_tokenizer):
    # A base whose generation config lists more end tokens than the tokenizer's EOS (Llama-3's
    # <|eot_id|>): eval stops at each, as chat does (generate.stop_ids).
    model, tokenizer = model_and_tokenizer
    bos, eos, pad, cpu = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu")
    prompts = [[bos, 7], [bos, 33, 8]]
    free = greedy_batch(model, prompts, 8, eos, pad, cpu)
    other = free[0][3]  # a token row 0 emits on its own: made the model's second end token
    assert len(free[0]) == 8 and other != eos
    assert stop_ids(model, tokenizer) == {eos}
    model.generation_config.eos_token_id = [eos, other]
    try:
        assert stop_ids(model, tokenizer) == {eos, other}
        stopped = greedy_batch(model, prompts, 8, stop_ids(model, tokenizer), pad, cpu)
        texts = generate(model, tokenizer, prompts, 8, len(prompts), cpu)
    finally:
        model.generation_config.eos_token_id = eos
    expected = [tokens[:tokens.index(other)] if other in tokens else tokens for tokens in free]
    assert stopped == expected and stopped[0] == free[0][:free[0].index(other)]
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in expected]


def test_held_out_loss_does_not_depend_on_the_micro_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    _, held_out, _ = build_datasets(tiny_recipe().data, tokenizer, 42)
    held_out = held_out[:20]
    cpu = torch.device("cpu")
    losses = [evaluate_loss(CausalLMLoss(model), held_out, micro_batch, tokenizer.pad_token_id, cpu)
              for micro_batch in (3, 8, 20)]
    for other in losses[1:]:
        assert other["eval_tokens"] == losses[0]["eval_tokens"]
        assert other["eval_loss"] == pytest.approx(losses[0]["eval_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def zero3_runs(adapter, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The same evaluation on 2 ZeRO-3 ranks (micro-batch 8) and 1 rank (micro-batch 4)."""
    out = tmp_path_factory.mktemp("eval")
    two = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/eval.py",
                   "recipes/tiny_alpaca.yaml", f"adapter={adapter}", f"out={out / 'two'}", *EVAL_ARGS,
                   "train.micro_batch_size=8"], env=ONE_THREAD)
    one = run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={adapter}", f"out={out / 'one'}",
                   *EVAL_ARGS, "train.micro_batch_size=4"], env=ONE_THREAD)
    return {"two": (out / "two", two.stdout), "one": (out / "one", one.stdout)}


def read_predictions(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_zero3_ranks_with_a_4bit_base_give_the_one_rank_predictions_and_loss(zero3_runs):
    (two_dir, _), (one_dir, _) = zero3_runs["two"], zero3_runs["one"]
    two, one = read_predictions(two_dir), read_predictions(one_dir)
    assert len(two) == len(one) == 24
    assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
    assert any(r["prediction"] for r in one)
    two_metrics, one_metrics = (json.loads((d / "metrics.json").read_text()) for d in (two_dir, one_dir))
    assert two_metrics["eval_tokens"] == one_metrics["eval_tokens"] > 0
    assert two_metrics["eval_loss"] == pytest.approx(one_metrics["eval_loss"], rel=1e-6)
    # DeepSpeed's shared-memory all-reduce op is not built: its build lock can hang every later run.
    assert "shm_comm" not in zero3_runs["two"][1]


@pytest.mark.slow
@pytest.mark.distributed
def test_predictions_file_and_metric_table(zero3_runs, tiny_base):
    directory, stdout = zero3_runs["two"]
    rows = read_predictions(directory)
    for row in rows:
        assert {"instruction", "input", "reference", "prediction", "exact_match", "token_f1", "rouge_l"} <= set(row)
    # The rows are the held-out split training evaluates on, in its order.
    recipe = tiny_recipe()
    expected, _ = evaluation_rows(recipe, load_tokenizer(str(tiny_base), recipe), None, 24)
    assert [(r["instruction"], r["input"], r["reference"]) for r in rows] == [
        (e["instruction"], e["input"], e["output"]) for e in expected]
    for label in ("exact match", "token F1", "ROUGE-L", "final-number accuracy", "held-out loss"):
        assert label in stdout
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["rows"] == 24 and 0 <= metrics["exact_match"] <= 1


def with_meta(adapter: Path, target: Path, **changes) -> Path:
    shutil.copytree(adapter, target)
    meta = json.loads((target / "meta.json").read_text())
    meta.update(changes)
    meta = {key: value for key, value in meta.items() if value is not None}
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_an_adapter_that_is_a_run_directory_or_a_missing_best_names_the_checkpoint_to_give(tmp_path):
    from trainer.checkpoint.best import COMPLETE

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / COMPLETE).write_text("")
    recipe = tiny_recipe()
    # a run evaluated nothing (data.eval_fraction=0): no best, its last checkpoint is named
    for given in (run, run / "checkpoints", run / "checkpoints" / "best"):
        with pytest.raises(CheckpointError, match=f"no checkpoint of this run is marked best yet: none was saved at "
                                                  f"an evaluation step .*; give adapter={run / 'checkpoints' / 'step-4'}, "
                                                  f"its last"):
            check_adapter(recipe, resolve_adapter(given))
    (run / "checkpoints" / "best").symlink_to("step-2")
    for given in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"a run's folder: give adapter={run / 'checkpoints' / 'best'}, "):
            check_adapter(recipe, resolve_adapter(given))
    with pytest.raises(CheckpointError, match="expected a checkpoint directory such as"):
        check_adapter(recipe, resolve_adapter(tmp_path))


def test_adapters_of_another_base_or_quantisation_are_refused(adapter, tmp_path, tiny_base):
    recipe = tiny_recipe()
    fingerprint = base_fingerprint(str(tiny_base))
    assert check_adapter(recipe, adapter) == []  # matching meta: no warning at all

    other = with_meta(adapter, tmp_path / "fingerprint", base_model="/models/llama-2-7b",
                      base_fingerprint="sha256:0123456789abcdef")
    with pytest.raises(AdapterMismatchError) as refused:
        check_adapter(recipe, other)
    for name in ("/models/llama-2-7b", "sha256:0123456789abcdef", str(tiny_base), fingerprint):
        assert name in str(refused.value)

    # A 4-bit adapter on the original 16-bit weights is allowed, with a warning naming the difference;
    # the other way round (a 16-bit adapter on a quantised base) is still refused.
    assert any("original 16-bit weights" in warning for warning in check_adapter(tiny_recipe("quant.bits=16"), adapter))
    with pytest.raises(AdapterMismatchError, match="16-bit.*4-bit"):
        check_adapter(recipe, with_meta(adapter, tmp_path / "sixteen", quant_bits=16))
    with pytest.raises(AdapterMismatchError, match="trained with the base in 8-bit, the recipe loads it in 4-bit "):
        check_adapter(recipe, with_meta(adapter, tmp_path / "eight", quant_bits=8))

    older = with_meta(adapter, tmp_path / "older", base_fingerprint=None)
    assert any("no base_fingerprint" in warning for warning in check_adapter(recipe, older))
    older_elsewhere = with_meta(adapter, tmp_path / "older_elsewhere", base_fingerprint=None,
                                base_model="/models/llama-2-7b")
    with pytest.raises(AdapterMismatchError, match="/models/llama-2-7b"):
        check_adapter(recipe, older_elsewhere)

    moved = with_meta(adapter, tmp_path / "moved", base_model="/old/place/tiny-llama")
    assert any("same fingerprint" in warning for warning in check_adapter(recipe, moved))

    result = run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={other}", f"out={tmp_path / 'x'}"],
                     env=ONE_THREAD, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and "sha256:0123456789abcdef" in result.stderr and fingerprint in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_recipe_that_would_hold_out_other_rows_than_the_run_is_warned_of(adapter, tmp_path):
    """The held-out split is drawn from train.seed and the data settings: evaluating with others
    scores rows the adapter may have trained on."""
    assert held_out_split_differences(tiny_recipe(), adapter) is None
    said = held_out_split_differences(tiny_recipe("train.seed=7", "data.eval_fraction=0.5"), adapter)
    seed = yaml.safe_load((adapter / "recipe.yaml").read_text())["train"]["seed"]
    assert f"train.seed={seed} there, 7 here" in said and "data.eval_fraction=" in said
    assert "may be rows it trained on" in said and f"Pass train.seed={seed} data.eval_fraction=" in said
    copy = tmp_path / "no-recipe"
    shutil.copytree(adapter, copy)
    (copy / "recipe.yaml").write_text("train: [seed: 7")  # cut short: named, not a YAML traceback
    for check in (held_out_split_differences, check_adapter):
        with pytest.raises(CheckpointError, match=r"recipe.yaml: unreadable"):
            check(tiny_recipe(), copy)
    (copy / "recipe.yaml").unlink()  # nothing to compare with: nothing said
    assert held_out_split_differences(tiny_recipe("train.seed=7"), copy) is None


def test_checkpoints_best_is_read_through_best_json_where_there_is_no_link(adapter, tmp_path):
    # Where symlinks are not allowed, training names the best checkpoint in checkpoints/best.json
    # (best.mark_best): adapter=<run>/checkpoints/best still means it, for eval, chat and export.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(adapter, checkpoints / "step-3")
    (checkpoints / "best.json").write_text(json.dumps({"best": "step-3", "eval_loss": 1.5}))
    assert resolve_adapter(checkpoints / "best") == (checkpoints / "step-3").resolve()
    assert check_adapter(tiny_recipe(), resolve_adapter(str(checkpoints / "best"))) == []
    (checkpoints / "best").symlink_to("step-3")  # a link wins over a stale note
    assert resolve_adapter(checkpoints / "best") == (checkpoints / "step-3").resolve()
    (checkpoints / "best").unlink()
    (checkpoints / "best.json").write_text("{")
    with pytest.raises(CheckpointError, match="best.json: unreadable"):
        resolve_adapter(checkpoints / "best")
    with pytest.raises(CheckpointError, match="checkpoints/best\\)"):
        check_adapter(tiny_recipe(), resolve_adapter(tmp_path / "nothing"))


def test_replacing_the_results_of_an_evaluation_asked_differently_is_noted(tmp_path):
    options = asdict(EvalOptions(adapter="a"))
    about = {"adapter": "a", "adapter_resolved": "/r/step-4", "options": options, "quant_bits": 4}
    assert replaced_note(tmp_path, about) is None  # nothing there yet
    write_results(tmp_path, [], [], [], {}, about)
    assert replaced_note(tmp_path, about) is None  # the same evaluation again
    other = {**about, "options": {**options, "file": "rows.jsonl"}, "quant_bits": 16}
    note = replaced_note(tmp_path, other)
    assert "other eval.file, quant_bits; replacing them (give out=DIR to keep both)" in note
    older = json.loads((tmp_path / "metrics.json").read_text())
    del older["quant_bits"]  # a file from before quant_bits was recorded
    (tmp_path / "metrics.json").write_text(json.dumps(older))
    assert replaced_note(tmp_path, about) is None


def test_results_go_beside_the_checkpoints_run_not_into_the_recipes(tmp_path, monkeypatch):
    """Two runs scored with one recipe keep their own results (the recipe's output_dir is a third)."""
    recipe = tiny_recipe()
    recipe.output_dir = str(tmp_path / "recipe_run")
    for run in ("run_a", "run_b"):
        adapter = tmp_path / run / "checkpoints" / "step-6"
        assert default_out(recipe, adapter) == tmp_path / run / "eval" / "step-6"
    assert default_out(recipe, tmp_path / "exported") == tmp_path / "recipe_run" / "eval" / "exported"
    assert default_out(recipe, None) == tmp_path / "recipe_run" / "eval" / "no-adapter"
    monkeypatch.chdir(tmp_path)  # a run under the working directory is named as the recipe's output_dir is
    assert default_out(recipe, tmp_path / "run_a" / "checkpoints" / "step-6") == Path("run_a/eval/step-6")
    # a run this user cannot write to (another's, a read-only share): the recipe's output_dir
    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_a" / "eval").write_text("")  # a file in the way stands for it here (root writes anywhere)
    fallback = default_out(recipe, tmp_path / "run_a" / "checkpoints" / "step-6")
    assert fallback == tmp_path / "recipe_run" / "eval" / "step-6"


def test_fingerprint_changes_with_the_weights_not_with_a_copy(tiny_base, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert base_fingerprint(str(copy)) == base_fingerprint(str(tiny_base))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] *= 1.01
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert base_fingerprint(str(copy)) != base_fingerprint(str(tiny_base))


def test_script_options_are_separated_from_recipe_overrides_and_checked():
    given, rest = split_argv(["r.yaml", "adapter=a", "out=o", "eval.batch_size=4", "train.seed=1", "--debug"],
                             EvalOptions, "eval")
    assert given == {"adapter": "a", "out": "o", "eval.batch_size": "4"}
    assert rest == ["r.yaml", "train.seed=1", "--debug"]
    options = parse_options(EvalOptions, {**given, "eval.max_rows": "null", "eval.loss": "false"}, "eval")
    assert (options.adapter, options.batch_size, options.max_rows, options.loss) == ("a", 4, None, False)
    assert parse_options(EvalOptions, {"out": "none", "eval.max_rows": "None"}, "eval").out is None  # not a dir "none"
    with pytest.raises(RecipeError, match="did you mean eval.max_new_tokens"):
        parse_options(EvalOptions, {"eval.max_new_token": "5"}, "eval")
    with pytest.raises(RecipeError, match="expected an integer"):
        parse_options(EvalOptions, {"eval.batch_size": "four"}, "eval")
    with pytest.raises(RecipeError, match="did you mean adapter="):
        split_argv(["r.yaml", "adpter=a"], EvalOptions, "eval")
    with pytest.raises(RecipeError, match="did you mean eval."):
        split_argv(["r.yaml", "evl.batch_size=3"], EvalOptions, "eval")
    with pytest.raises(RecipeError, match="eval.max_rows must be positive"):  # -3 would slice all but 3 rows
        run_eval(tiny_recipe(), parse_options(EvalOptions, {"adapter": "none", "eval.max_rows": "-3"}, "eval"))


def test_an_unknown_recipe_key_still_errors_through_the_script(capsys, adapter):
    from trainer.evaluation.eval_command import main

    with pytest.raises(SystemExit) as exit_info:
        main(["recipes/tiny_alpaca.yaml", f"adapter={adapter}", "train.max_stepz=3"])
    assert exit_info.value.code == 2
    assert "unknown key train.max_stepz; did you mean train.max_steps?" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_gives_the_held_out_loss_training_logged_in_bf16(tmp_path, tiny_base):
    """Training runs the adapters in bf16 (DeepSpeed casts them); eval.py loads them in that dtype
    too, so it scores the model training scored: the same held-out loss for the same checkpoint."""
    data = ["data.max_rows=60", "data.max_eval_rows=16", "train.micro_batch_size=4", "model.dtype=bfloat16"]
    run_cli(["launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={tmp_path}", *data,
             "train.global_batch_size=8", "train.max_steps=3", "train.warmup_steps=1", "train.save_every=3",
             "train.eval_every=3", "train.sample_count=0"], env=ONE_THREAD)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    run_cli(["launch/eval.py", "recipes/tiny_alpaca.yaml", f"adapter={tmp_path / 'checkpoints/step-3'}",
             f"out={tmp_path / 'eval'}", "eval.max_new_tokens=2", *data], env=ONE_THREAD)
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["eval_loss"] == pytest.approx(logged, rel=1e-6)


# The loss pass replaced: it finds the files already written, then fails as an out-of-memory would.
LOSS_FAILS = """
import json, sys
from pathlib import Path
import trainer.evaluation.eval_command as eval_command

def failing_loss(*args, **kwargs):
    out = Path(sys.argv[-1].removeprefix("out="))
    seen = {"predictions": len((out / "predictions.jsonl").read_text().splitlines()),
            "metrics": json.loads((out / "metrics.json").read_text())}
    (out.parent / "seen.json").write_text(json.dumps(seen))
    raise RuntimeError("CUDA out of memory (a stand-in)")

eval_command.evaluate_loss = failing_loss
eval_command.main(sys.argv[1:])
"""


def test_predictions_and_metrics_are_written_before_the_loss_pass_which_may_fail(tmp_path, tiny_base):
    out = tmp_path / "eval"
    result = run_cli(["python", "-c", LOSS_FAILS, "recipes/tiny_alpaca.yaml", "adapter=none", "eval.max_rows=4",
                      "eval.max_new_tokens=4", f"out={out}"], env=ONE_THREAD, check=False)
    assert result.returncode == 1 and "CUDA out of memory (a stand-in)" in result.stderr, result.stderr[-2000:]
    assert "the held-out loss next (eval.loss=false skips it)" in result.stdout
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["predictions"] == 4 and seen["metrics"]["rows"] == 4 and "eval_loss" not in seen["metrics"]
    assert len(read_predictions(out)) == 4  # still there after the failure
    assert sorted(path.name for path in out.iterdir()) == ["metrics.json", "predictions.jsonl"]  # no half file


def test_results_are_replaced_whole_through_a_rename(tmp_path, monkeypatch):
    about = {"adapter": None, "adapter_resolved": None, "options": asdict(EvalOptions(adapter="none")), "quant_bits": 4}
    write_results(tmp_path, [{"reference": "1"}], ["1"], [{"exact_match": 1.0}], {"rows": 1}, about)
    import trainer.evaluation.eval_command as eval_command

    def crash(source, target):
        raise OSError("disk full (a stand-in)")

    monkeypatch.setattr(eval_command.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_metrics(tmp_path, {"rows": 1, "eval_loss": 2.0}, about)
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == 1  # the earlier file, whole
    monkeypatch.undo()
    write_metrics(tmp_path, {"rows": 1, "eval_loss": 1e4, "perplexity": math.inf}, about)  # exp(1e4) overflows

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)["perplexity"] is None


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("empty.json", "[]"),
                                        ("header_only.csv", "instruction,output\n")])
def test_an_empty_eval_file_is_named_by_its_option(tmp_path, name, text):
    from trainer.data.formats import DataError

    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as refused:
        evaluation_rows(tiny_recipe(), None, str(tmp_path / name), None)  # refused before the tokenizer is used
    assert "has no records" in str(refused.value) and "eval.file" in str(refused.value)
    assert "data.path" not in str(refused.value)
