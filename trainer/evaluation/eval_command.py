"""Generation-based evaluation of an adapter: greedy answers to held-out instructions, scored.

    python launch/eval.py RECIPE adapter=<checkpoint dir>|none [eval.file=<json/jsonl>] [out=<dir>]
        [eval.max_new_tokens=64] [eval.batch_size=16] [eval.max_rows=N] [eval.loss=true] [section.key=value ...]

The rows are the recipe's held-out split (same rows as training's eval loss: same data config and
train.seed), or every row of eval.file. Writes <out>/predictions.jsonl and <out>/metrics.json and
prints the metric table. Under `deepspeed --num_gpus N` with deepspeed.zero_stage=3 the base is
partitioned across ranks; the predictions are the same as on one rank.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

from trainer import options
from trainer.runtime import distributed
from trainer.evaluation import scores
from trainer.checkpoint.reading import check_adapter, resolve_adapter
from trainer.evaluation.adapted_model import load_adapted_model
from trainer.config import DataSource, Recipe, RecipeError, deepspeed_config
from trainer.data.encoding import Example
from trainer.data.pipeline import build_datasets, held_out_rows, load_source
from trainer.data.formats import locate, read_source
from trainer.evaluation.held_out_loss import evaluate_loss
from trainer.evaluation.generate import generate, prompt_ids, row_texts
from trainer.loss import CausalLMLoss
from trainer.model.base import dtype_name


@dataclass
class EvalOptions:
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("adapter", "out")
    adapter: str = ""  # checkpoint directory, or none: the base alone
    out: str | None = None  # default <output_dir>/eval/<checkpoint name>
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
        located = locate(file, data.split)
        rows = [row.fields for row in read_source(located, data.format, data.columns, max_rows, data.on_bad_row).rows]
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
    device = distributed.init()
    log = print if distributed.is_main() else (lambda *a, **k: None)
    # Resolved once: a `best` link that moves while this runs must not change what is evaluated.
    adapter_dir = None if opts.adapter.lower() == "none" else resolve_adapter(opts.adapter)
    if adapter_dir is not None:
        for warning in check_adapter(recipe, adapter_dir):
            log(f"warning: {warning}")
    model, tokenizer, dtype = load_adapted_model(recipe, adapter_dir, device)
    with distributed.main_first():
        rows, examples = evaluation_rows(recipe, tokenizer, opts.file, opts.max_rows)
    if not rows:
        raise RecipeError("no rows to evaluate (the held-out split is empty: data.eval_fraction=0 and no "
                          "data.eval_path; give eval.file=<json/jsonl>)")
    loss_model = CausalLMLoss(model)
    if recipe.deepspeed.zero_stage == 3:
        import deepspeed

        # Partition the base over the ranks as in training; forward hooks gather each layer's
        # weights when it runs, so the decoding below calls the model as usual.
        config = deepspeed_config(recipe, distributed.world_size(), dtype_name(dtype))
        deepspeed.initialize(model=loss_model, config=config)

    # A prompt keeps room for the answer within the training length.
    max_prompt = max(recipe.data.max_seq_len - opts.max_new_tokens, 1)
    prompts = [prompt_ids(tokenizer, row, recipe.data.template, max_prompt) for row in rows]
    # Through the loss wrapper: under ZeRO-3 it is the module DeepSpeed's hooks expect every forward to enter.
    predictions = generate(loss_model, tokenizer, prompts, opts.max_new_tokens, opts.batch_size, device)
    texts = [row_texts(row) for row in rows]
    row_scores = [scores.score(prediction, text["reference"]) for text, prediction in zip(texts, predictions)]
    summary = scores.summarise(row_scores)
    if opts.loss and examples:
        summary.update(evaluate_loss(loss_model, examples, recipe.train.micro_batch_size, tokenizer.pad_token_id,
                                     device))

    if distributed.is_main():
        # checkpoints/best resolves to the step-<N> it points at: results are named by what was scored.
        out = Path(opts.out) if opts.out else Path(recipe.output_dir) / "eval" / (
            adapter_dir.name if adapter_dir is not None else "no-adapter")
        about = {"adapter": opts.adapter if adapter_dir else None,
                 "adapter_resolved": str(adapter_dir) if adapter_dir else None, "options": asdict(opts),
                 "quant_bits": recipe.quant.bits}
        if (note := replaced_note(out, about)) is not None:
            log(note)
        write_results(out, texts, predictions, row_scores, summary, about)
        log(scores.format_table(summary))
        log(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    distributed.barrier()
    return summary


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
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for text, prediction, score in zip(texts, predictions, scores):
            record = {**text, "prediction": prediction, **score}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({**summary, **about}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    options.main(run_eval, EvalOptions, "eval", argv)
