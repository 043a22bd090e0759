"""Generation-based evaluation of an adapter: greedy answers to held-out instructions, scored.

    python launch/eval.py RECIPE adapter=<checkpoint dir>|none [eval.file=<json/jsonl>] [out=<dir>]
        [eval.max_new_tokens=64] [eval.batch_size=16] [eval.max_rows=N] [eval.loss=true] [section.key=value ...]

The rows are the recipe's held-out split (same rows as training's eval loss: same data config and
train.seed), or every row of eval.file. Writes <out>/predictions.jsonl and <out>/metrics.json as
soon as the answers are scored, adds the held-out loss to metrics.json after its pass, and prints the
metric table. Under `deepspeed --num_gpus N` with deepspeed.zero_stage=3 the base is
partitioned across ranks; the predictions are the same as on one rank.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

from trainer import options
from trainer.runtime import distributed, run_dir
from trainer.evaluation import scores
from trainer.checkpoint.reading import (check_adapter, held_out_examples_note, held_out_split_differences,
                                        resolve_adapter)
from trainer.evaluation.adapted_model import load_adapted_model
from trainer.config import DataConfig, DataSource, Recipe, RecipeError
from trainer.runtime.deepspeed_config import deepspeed_config
from trainer.runtime.metrics_log import finite
from trainer.data.examples import Example, examples_identity
from trainer.data.pipeline import build_datasets, held_out_rows, load_source
from trainer.data.formats import DataError
from trainer.data.sources import locate, read_source
from trainer.evaluation.held_out_loss import evaluate_loss
from trainer.evaluation.generate import generate, prompt_ids, row_texts
from trainer.loss import CausalLMLoss
from trainer.model.base import dtype_name, load_tokenizer, resolve_base


@dataclass
class EvalOptions:
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("adapter", "out")
    adapter: str = ""  # checkpoint directory, or none: the base alone
    out: str | None = None  # default <run>/eval/<checkpoint name> (default_out)
    file: str | None = None  # instructions to answer instead of the held-out split (json/jsonl, with outputs)
    max_new_tokens: int = 64  # generated tokens per answer, EOS aside
    batch_size: int = 16  # prompts decoded together on one rank
    max_rows: int | None = None  # evaluate only the first N rows
    loss: bool = True  # also the held-out loss (teacher-forced, micro-batch train.micro_batch_size)


def evaluation_rows(recipe: Recipe, tokenizer, file: str | None,
                    max_rows: int | None) -> tuple[list[dict], list[Example]]:
    """Rows to answer, and tokenised examples for the loss. Without `file`: the held-out examples
    training evaluates on (`build_datasets`, same data config and train.seed), mapped back to
    their rows through the row ids they keep."""
    data = recipe.data
    if file is not None:
        try:  # named by the option that gave the file: its errors would otherwise read like data.path's
            located = locate(file, data.split)
            rows = [row.fields for row in read_source(located, data.format, data.columns, max_rows,
                                                      data.on_bad_row).rows]
        except DataError as error:
            raise DataError(f"eval.file: {error}") from None
        source = DataSource(file, 1.0, data.split, data.format, data.columns)
        return rows, load_source(source, replace(data, max_rows=max_rows), tokenizer).examples
    _, held_out, _ = build_datasets(data, tokenizer, recipe.train.seed)
    held_out = held_out[:max_rows] if max_rows is not None else held_out
    return held_out_rows(data, held_out), held_out


def run_eval(recipe: Recipe, opts: EvalOptions) -> dict:
    if not opts.adapter:
        raise RecipeError("adapter= is required: a checkpoint directory, or adapter=none for the base alone")
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise RecipeError("eval.batch_size and eval.max_new_tokens must be positive")
    if opts.max_rows is not None and opts.max_rows < 1:
        raise RecipeError(f"eval.max_rows must be positive (or left out: every row), got {opts.max_rows}")
    # Resolved once: a `best` link that moves while this runs must not change what is evaluated.
    adapter_dir = None if opts.adapter.lower() == "none" else resolve_adapter(opts.adapter)
    # checkpoints/best resolves to the step-<N> it points at: results are named by what was scored.
    out = Path(opts.out) if opts.out else default_out(recipe, adapter_dir)
    check_out(out, given=bool(opts.out))
    device = distributed.init()
    log = print if distributed.is_main() else (lambda *a, **k: None)
    if adapter_dir is not None:
        split = held_out_split_differences(recipe, adapter_dir) if opts.file is None else None
        for warning in [*check_adapter(recipe, adapter_dir), *([split] if split else [])]:
            log(f"warning: {warning}")
    # The rows and prompts before the model: a refused eval.max_new_tokens must not wait for a base to load.
    with distributed.main_first():
        tokenizer = load_tokenizer(resolve_base(recipe), recipe)
        rows, examples = evaluation_rows(recipe, tokenizer, opts.file, opts.max_rows)
    if not rows:
        raise RecipeError("no rows to evaluate (the held-out split is empty: data.eval_fraction=0 and no "
                          "data.eval_path; give eval.file=<json/jsonl>)")
    if adapter_dir is not None and opts.file is None and opts.max_rows is None and opts.loss and split is None:
        if (note := held_out_examples_note(recipe, adapter_dir, examples_identity(examples))) is not None:
            log(note)
    prompts, cut_note = eval_prompts(tokenizer, rows, recipe.data, opts.max_new_tokens)
    if cut_note is not None:
        log(cut_note)
    model, _, dtype = load_adapted_model(recipe, adapter_dir, device, tokenizer)
    loss_model = CausalLMLoss(model)
    if recipe.deepspeed.zero_stage == 3:
        import deepspeed

        # Partition the base over the ranks as in training; forward hooks gather each layer's
        # weights when it runs, so the decoding below calls the model as usual.
        config = deepspeed_config(recipe, distributed.world_size(), dtype_name(dtype))
        deepspeed.initialize(model=loss_model, config=config)

    # Through the loss wrapper: under ZeRO-3 it is the module DeepSpeed's hooks expect every forward to enter.
    predictions = generate(loss_model, tokenizer, prompts, opts.max_new_tokens, opts.batch_size, device)
    texts = [row_texts(row) for row in rows]
    row_scores = [scores.score(prediction, text["reference"]) for text, prediction in zip(texts, predictions)]
    summary = scores.summarise(row_scores)
    about = {"adapter": opts.adapter if adapter_dir else None,
             "adapter_resolved": str(adapter_dir) if adapter_dir else None, "options": asdict(opts),
             "quant_bits": recipe.quant.bits}
    loss = opts.loss and bool(examples)
    # Written before the loss pass: its full-length micro-batches can run out of memory where decoding
    # did not, and that must not lose the predictions.
    if distributed.is_main():
        if (note := replaced_note(out, about)) is not None:
            log(note)
        write_results(out, texts, predictions, row_scores, summary, about)
        if loss:
            log(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}; the held-out loss next "
                f"(eval.loss=false skips it)")
    if loss:
        summary.update(evaluate_loss(loss_model, examples, recipe.train.micro_batch_size, tokenizer.pad_token_id,
                                     device))
        if distributed.is_main():
            write_metrics(out, summary, about)

    if distributed.is_main():
        log(scores.format_table(summary))
        log(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    distributed.barrier()
    return summary


def default_out(recipe: Recipe, adapter_dir: Path | None) -> Path:
    """Where results go without out=: beside the checkpoint's own run, <run>/eval/step-<N> (as analyze
    writes <run>/analysis/), so that two runs scored with one recipe keep their own; for the base
    alone, an adapter outside a run's checkpoints/, or a run this user cannot write to (another's),
    <output_dir>/eval/<name>."""
    own = Path(recipe.output_dir) / "eval" / (adapter_dir.name if adapter_dir is not None else "no-adapter")
    if adapter_dir is None or adapter_dir.parent.name != "checkpoints":
        return own
    run = adapter_dir.parent.parent
    if run.is_relative_to(Path.cwd()):
        run = run.relative_to(Path.cwd())  # runs/x/eval/step-6 in the log, as the recipe's output_dir reads
    return own if run_dir.unwritable(run / "eval") else run / "eval" / adapter_dir.name


def check_out(out: Path, given: bool) -> None:
    """Refuse an `out` that is, or lies under, an existing file, or where this user cannot write, before
    anything is loaded: only rank 0 writes the results, so its mkdir would fail there alone after the
    whole evaluation, with the other ranks waiting at the barrier. Every rank checks the same path, so
    every rank refuses. `given`: out= was given (else `out` is default_out's)."""
    named = f"out={out}" if given else f"the default out={out}"
    existing = run_dir.nearest_existing(out)
    if existing is not None and not existing.is_dir():
        where = "names an existing file" if existing == out else f"lies under {existing}, an existing file"
        raise RecipeError(f"{named} {where}; give out=<directory> for predictions.jsonl and metrics.json")
    if reason := run_dir.unwritable(out):
        raise RecipeError(f"{named}: {reason}; give out=<directory> this user can write to")


def eval_prompts(tokenizer, rows: list[dict], data: DataConfig,
                 max_new_tokens: int) -> tuple[list[list[int]], str | None]:
    """Each row's prompt, cut from its start as training cuts prompts so that it leaves room for
    `max_new_tokens` within data.max_seq_len, and a note saying how many were cut and by how much
    (None when none was: the prompts are then the whole ones). Every rank computes the same prompts,
    so where this refuses, every rank does.

    Refused (RecipeError) when at least half the prompts would keep less than half the text they
    could hold in data.max_seq_len: the scores would then grade answers to questions the model never
    saw (eval.max_new_tokens=128 of data.max_seq_len=128 left an Alpaca prompt its last token, "\\n").
    Text is what a cut can remove: BOS and chat markup are always kept, and counted they would hide a
    chat prompt emptied of its question. It is measured against data.max_seq_len, not the whole prompt,
    so prompts longer than training ever saw (training cut them too) are noted, not refused; so are
    fewer prompts cut deep, whose share of the scores the note tells."""
    max_prompt = max(data.max_seq_len - max_new_tokens, 1)
    prompts = [prompt_ids(tokenizer, row, data.template, max_prompt) for row in rows]
    cuts, starved = [], 0
    for row, prompt in zip(rows, prompts):
        if len(prompt) < max_prompt:  # a cut prompt fills max_prompt (or more, where kept markup does)
            continue
        cut = len(prompt_ids(tokenizer, row, data.template)) - len(prompt)
        if cut <= 0:
            continue
        kept_always = len(prompt_ids(tokenizer, row, data.template, 0))  # BOS and chat markup
        room = min(len(prompt) + cut, data.max_seq_len) - kept_always
        cuts.append(cut)
        starved += 2 * (len(prompt) - kept_always) < room
    if starved and 2 * starved >= len(rows):
        raise RecipeError(f"eval.max_new_tokens={max_new_tokens} leaves a prompt {max_prompt} of data.max_seq_len="
                          f"{data.max_seq_len} tokens: {starved} of {len(rows)} prompts would keep less than half "
                          f"their text; lower eval.max_new_tokens or raise data.max_seq_len")
    if not cuts:
        return prompts, None
    by = f"{max(cuts)} token" + "s" * (max(cuts) > 1)
    return prompts, (f"note: {len(cuts)} of {len(rows)} prompts cut from their start, by up to {by}, to "
                     f"{max_prompt} tokens (eval.max_new_tokens={max_new_tokens} within data.max_seq_len="
                     f"{data.max_seq_len}); raise data.max_seq_len or lower eval.max_new_tokens to keep more of them")


def replaced_note(out: Path, about: dict) -> str | None:
    """A note when `out` holds the results of an evaluation asked differently (another eval.file,
    eval.max_rows, quant.bits, adapter), which this one replaces; None otherwise."""
    try:
        earlier = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    # Keys an earlier file lacks (written before they were recorded) say nothing either way.
    before = earlier.get("options") or {}
    changed = sorted({key for key in ("adapter_resolved", "quant_bits") if key in earlier and earlier[key] != about[key]}
                     | {f"eval.{key}" for key, value in about["options"].items()
                        if key not in ("out", "adapter") and key in before and before[key] != value})
    return None if not changed else (
        f"note: {out} held the results of an evaluation with other {', '.join(changed)}; replacing them "
        f"(give out=DIR to keep both)")


def write_results(out: Path, texts: list[dict[str, str]], predictions: list[str], scores: list[dict],
                  summary: dict, about: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**text, "prediction": prediction, **score}, ensure_ascii=False) + "\n"
             for text, prediction, score in zip(texts, predictions, scores)]
    write_whole(out / "predictions.jsonl", "".join(lines))
    write_metrics(out, summary, about)


def write_metrics(out: Path, summary: dict, about: dict) -> None:
    write_whole(out / "metrics.json", json.dumps(finite({**summary, **about}), indent=2, allow_nan=False) + "\n")


def write_whole(path: Path, text: str) -> None:
    """Through a temporary file and a rename: a crash leaves the earlier file or the new one, never half."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def main(argv: list[str] | None = None) -> None:
    options.main(run_eval, EvalOptions, "eval", argv)
