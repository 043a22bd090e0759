"""The training loop, top to bottom: setup (tokenizer, data, base, adapters, engine, restore),
then steps: micro-batches, backward, optimizer step; log, evaluate, sample and save every N."""
from __future__ import annotations

import functools
import hashlib
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer import speedups
from trainer.checkpoint import reading, resume, saving
from trainer.checkpoint.fingerprint import base_fingerprint
from trainer.checkpoint.saving import TrainState
from trainer.checkpoint.snapshot import UpdateSnapshot
from trainer.config import Recipe, RecipeError, TrainConfig
from trainer.runtime.deepspeed_config import check_deepspeed_config, deepspeed_config
from trainer.data.batching import BatchPlan
from trainer.data.formats import DataError
from trainer.data.packing import training_collate
from trainer.data.pipeline import build_datasets, held_out_rows, rows_by_file
from trainer.data.stats import DataStats, chat_rendered, no_training_examples
from trainer.data.store import Examples
from trainer.evaluation.generate import sample_generations
from trainer.evaluation.held_out_loss import evaluate_loss
from trainer.loss import CausalLMLoss, logit_transform
from trainer.model.base import (check_embedding_rows, compute_dtype, dtype_name, enable_activation_checkpointing,
                                load_base, load_tokenizer, resolve_base)
from trainer.model.lora import adapter_parameters, apply_lora, link_group_states, optimizer_groups, parameter_summary
from trainer.runtime import distributed, health, preflight, run_dir
from trainer.runtime.quiet import TrainerWarning
from trainer.runtime.dashboards import Dashboards, check_wandb_login
from trainer.runtime.metrics_log import MetricsLog
from trainer.runtime.report import append_samples, format_samples, write_report
from trainer.runtime.signals import StopRequest

SAMPLE_MAX_NEW_TOKENS = 48  # sample answers in the training log stay short: a glance, not an evaluation


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at max_steps."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return train.learning_rate * (train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingData:
    """The examples a run trains and evaluates on, and the order it sees them in. The examples are
    index arrays into memory-mapped stores (trainer/data/store.py): an `Example` is read when a
    batch needs it, and the ranks of a node share the pages."""
    train_set: Examples
    eval_set: Examples
    stats: DataStats  # str() is the table printed before training
    sample_rows: list[dict]  # held-out rows answered in the training log (train.sample_count)
    token_counts: np.ndarray  # trained (label != -100) tokens of each training example
    plan: BatchPlan

    @functools.cached_property
    def held_out_identity(self) -> str:
        """What the held-out loss is scored on, as a hash of each held-out example's tokens and labels:
        a resume compares it with the checkpoint's before comparing losses."""
        digest = hashlib.sha256()
        for example in self.eval_set:
            for array in (example.input_ids, example.labels):
                values = np.asarray(array, dtype=np.int32)
                digest.update(len(values).to_bytes(8, "little") + values.tobytes())
        return digest.hexdigest()[:16]

    def trained_tokens(self, step: int) -> int:
        """Response tokens the loss is taken on in optimizer step `step` (0-based), over all ranks."""
        return int(self.token_counts[self.plan.indices(step)].sum())


@dataclass
class Run:
    """Everything the steps need, built once by `setup`."""
    recipe: Recipe
    device: torch.device
    tokenizer: object
    data: TrainingData
    model: torch.nn.Module  # the transformers model with our LoRA layers
    loss_model: torch.nn.Module  # what DeepSpeed wraps
    engine: object
    optimizer: torch.optim.Optimizer
    collate: object  # micro-batch -> tensors (packed rows when data.packing)
    base_name_or_path: str
    meta: dict  # what a checkpoint says about the run (meta.json)


def train(recipe: Recipe, dry_run: bool = False) -> TrainState | None:
    run, state = setup(recipe, dry_run)
    if run is None:  # a dry run, or nothing to train
        run_dir.unlock(Path(recipe.output_dir))
        return None
    rank = distributed.rank()
    metrics = MetricsLog(Path(recipe.output_dir))
    dashboards = Dashboards(recipe, resumed_step=state.step)  # train.report_to: TensorBoard and/or W&B, rank 0
    progress = tqdm(total=recipe.train.max_steps, initial=state.step, disable=rank != 0, desc="train",
                    dynamic_ncols=True)
    say = progress.write if rank == 0 else (lambda *_: None)
    stop_request = StopRequest()  # SIGTERM / SIGINT: save at the next step boundary, exit cleanly
    skips = Skips(overflows=state.overflow_skips)  # a resumed run counts on from the checkpoint's
    run.engine.train()
    while state.step < recipe.train.max_steps:
        started = time.perf_counter()
        lr = learning_rate(state.step, recipe.train)
        snapshot = (UpdateSnapshot(run.model, run.optimizer, run.engine.optimizer)
                    if recipe.train.on_nonfinite == "skip" else None)
        step_tokens = run.data.trained_tokens(state.step)
        # Read at the end of the step, where the ranks share it: a signal during step N saves at N.
        loss, grad_norm, stops, bad_rows, overflowed = train_step(run, state.step, lr,
                                                                  lambda: stop_request.requested, step_tokens)
        skipped = skips.check(state.step + 1, run, lr, loss, grad_norm, bad_rows, overflowed, snapshot, say)
        state.step += 1
        state.overflow_skips = skips.overflows
        record = advance(state, run, loss, lr, started, step_tokens, skipped)
        if skips.overflows:
            record["overflow_skips"] = skips.overflows
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        after_step(run, state, record, stops, say, metrics, dashboards)
        if stops and state.step < recipe.train.max_steps:
            say(f"stopping at step {state.step} as asked ({stop_request.signal_name or 'signal on another rank'}); "
                f"continue with resume=auto")
            break
    progress.close()
    metrics.close()
    dashboards.close()
    if distributed.is_main() and recipe.train.report:
        report = write_report(Path(recipe.output_dir))
        if report is not None:
            print(f"report: {report}")
    stop_request.restore()
    run_dir.unlock(Path(recipe.output_dir))  # the process may go on (tests); its end would release it too
    return state


@dataclass
class Skips:
    """Updates skipped so far: non-finite ones in a row (train.on_nonfinite=skip), fp16 overflows in all."""
    nonfinite: int = 0
    overflows: int = 0

    def check(self, step: int, run: Run, lr: float, loss: float, grad_norm: float | None, bad_rows: list[int],
              overflowed: bool, snapshot: UpdateSnapshot | None, say: Callable[[str], None]) -> bool:
        """Whether step `step` (1-based) was skipped; raises when training cannot go on."""
        if overflowed and health.is_finite(loss):
            # fp16 loss scaling: DeepSpeed found inf/NaN gradients, skipped this update and lowered the
            # scale. Normal in the first steps (the scale starts high on purpose); counted, not fatal.
            # DeepSpeed itself stops a run whose scale reaches its minimum.
            self.overflows += 1
            say(f"step {step}: fp16 gradient overflow, update skipped and loss scale lowered "
                f"({self.overflows} so far)")
            return True
        if health.is_finite(loss) and health.is_finite(grad_norm):
            self.nonfinite = 0
            return False
        self.nonfinite += 1
        if snapshot is None or self.nonfinite > run.recipe.train.max_consecutive_skips:
            raise health.TrainingHealthError(health.nonfinite_message(
                step, lr, loss, grad_norm, rows_by_file(run.data.train_set, run.recipe.data, bad_rows),
                skips=self.nonfinite - 1 if snapshot is not None else None))
        snapshot.restore()
        say(f"step {step}: non-finite loss/gradient, update skipped ({self.nonfinite} in a row)")
        return True


def after_step(run: Run, state: TrainState, record: dict, stops: bool, say: Callable[[str], None],
               metrics: MetricsLog, dashboards: Dashboards) -> None:
    """Every N steps (and at the last, or when asked to stop): evaluate, sample, log, save."""
    train = run.recipe.train
    last = state.step == train.max_steps
    if state.step % train.eval_every == 0 or last:
        record.update(evaluate_held_out(run, state))
        if "eval_loss" in record:
            say(f"step {state.step}: loss {record['loss']:.4f}  eval_loss {record['eval_loss']:.4f}  "
                f"eval_ppl {record['eval_ppl']:.2f}")
    if run.data.sample_rows and not stops and ((train.sample_every and state.step % train.sample_every == 0) or last):
        sample(run, state.step, say, dashboards)
    if state.step % train.log_every == 0 or "eval_loss" in record or last:
        metrics.write(record)
        dashboards.write(record)
    if state.step % train.save_every == 0 or last or stops:
        state.loss_scale = saving.loss_scale_state(run.engine.optimizer)
        saved = saving.save(Path(run.recipe.output_dir), run.model, run.optimizer, run.recipe, run.base_name_or_path,
                            state, run.meta, record.get("eval_loss"))
        say(f"saved {saved}")


def fp16_supported() -> bool:
    """Whether DeepSpeed trains fp16 here: its accelerator's own check, the one its engine makes (on a CPU,
    whether oneDNN computes fp16: AVX-512 FP16 or AMX-FP16)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def check_precision(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse fp16 on a CPU without it before the model loads: DeepSpeed's engine stops after that, with
    "Type fp16 is not supported on your device"."""
    if dtype == torch.float16 and device.type == "cpu" and not fp16_supported():
        raise RecipeError("model.dtype=float16: this CPU has no fp16 arithmetic (AVX-512 FP16 or AMX-FP16), "
                          "which DeepSpeed needs to train in fp16 on a CPU; use model.dtype=float32 (auto, the "
                          "fastest on a CPU) or bfloat16")


def setup(recipe: Recipe, dry_run: bool) -> tuple[Run | None, TrainState]:
    """In the order the user's data flows: what the recipe and world size alone decide (batch sizes, the
    DeepSpeed config), tokenizer, the checkpoint to resume from, data, base, adapters, engine, restored
    state. A refused setting, a missing file, a refused checkpoint or a bad row is reported before the
    base (minutes for a 7B one) is loaded."""
    device = distributed.init(recipe.train.collective_timeout_minutes)
    log = print if distributed.is_main() else (lambda *a, **k: None)
    dtype = compute_dtype(recipe, device)  # what load_base loads in
    check_precision(dtype, device)
    # Known from the recipe and the world size: refused before tokenising data or loading the base, in a dry run too.
    ds_config = deepspeed_config(recipe, distributed.world_size(), dtype_name(dtype))
    check_deepspeed_config(ds_config, recipe.deepspeed.extra)
    check_wandb_login(recipe)  # before minutes of loading, not after them in wandb.init
    if not dry_run:  # a dry run writes nothing in output_dir, so it may check a recipe beside a running run
        run_dir.lock(Path(recipe.output_dir))  # every rank: rank 0 holds it; a second run there is refused
    elif reason := run_dir.unwritable(Path(recipe.output_dir)):  # what lock would refuse, found without writing
        raise RecipeError(f"output_dir={recipe.output_dir}: {reason}; output_dir must be a folder this user can "
                          f"write to; choose another output_dir=")
    seed_everything(recipe.train.seed)
    base_name_or_path, tokenizer = prepare_tokenizer(recipe)
    # The checkpoint to resume from, and whether it fits this recipe and base, before the data and the
    # base load (a dry run refuses what the run would).
    resume_dir = resume.find_resume_dir(recipe)
    if resume_dir is not None:
        resume.check_compatible(resume_dir, recipe)
        saved_step = (reading.read_meta(resume_dir) or {}).get("step", 0)
        if saved_step >= recipe.train.max_steps and not dry_run:  # before minutes of loading for no step
            log(f"nothing to train: {resume_dir} is at step {saved_step} and train.max_steps is "
                f"{recipe.train.max_steps}; raise train.max_steps to train on")
            return None, TrainState(step=saved_step)
    data = prepare_data(recipe, tokenizer)
    log(str(data.stats))
    model, _ = prepare_model(recipe, device, tokenizer)
    logit_transform(model)  # a model whose logits the loss cannot reproduce is refused here, in a dry run too
    log(parameter_summary(model))
    mean_tokens = float(data.train_set.lengths().mean())  # prepare_data refused an empty training set
    log(preflight.summary(recipe, model, data.stats, distributed.world_size(), dtype, base_name_or_path, resume_dir,
                          mean_tokens))
    if resume_dir is not None:
        trained = reading.trained_dtype(resume_dir)
        if trained not in (None, dtype_name(dtype)):  # model.dtype=auto on another device
            log(f"warning: {resume_dir} was trained with the base in {trained}, this run loads it in "
                f"{dtype_name(dtype)}: its weights (and 4-bit codes) round differently, so the run does not "
                f"continue exactly; model.dtype={trained} keeps it")
    if dry_run:
        log("dry run: recipe, model, data" + (", resume checkpoint" if resume_dir is not None else "")
            + " and DeepSpeed config are valid; not training")
        return None, TrainState()
    if resume_dir is not None:
        reading.load_into_model(model, resume_dir)
    loss_model, engine, optimizer = prepare_engine(recipe, model, ds_config)
    state = restore(recipe, resume_dir, model, optimizer, engine, len(data.train_set), data.held_out_identity,
                    log)
    if distributed.is_main() and (note := run_dir.prepare(Path(recipe.output_dir),
                                                         state.step if resume_dir is not None else None, resume_dir,
                                                         resume_auto=recipe.resume == "auto")):
        log(note)
    meta = {"base_model": base_name_or_path, "base_fingerprint": base_fingerprint(base_name_or_path,
                                                                                  recipe.model.revision),
            "quant_bits": recipe.quant.bits, "template": recipe.data.template, "world_size": distributed.world_size(),
            "zero_stage": recipe.deepspeed.zero_stage, "model_dtype": dtype_name(dtype),
            "chat_rendered": chat_rendered(data.stats)}
    run = Run(recipe=recipe, device=device, tokenizer=tokenizer, data=data, model=model, loss_model=loss_model,
              engine=engine, optimizer=optimizer, collate=training_collate(recipe, model, tokenizer.pad_token_id),
              base_name_or_path=base_name_or_path, meta=meta)
    return run, state


def prepare_tokenizer(recipe: Recipe) -> tuple[str, object]:
    """The base's location (a built-in or a .gguf is created or converted here) and its tokenizer.
    Each node's first rank goes first, so a built-in base is created once."""
    with distributed.main_first():
        base_name_or_path = resolve_base(recipe)
        return base_name_or_path, load_tokenizer(base_name_or_path, recipe)


def prepare_data(recipe: Recipe, tokenizer) -> TrainingData:
    """Read, validate, tokenise and check every dataset; split train and held-out rows."""
    with distributed.main_first():  # the first rank tokenises and caches; the others read the cache
        train_set, eval_set, stats = build_datasets(recipe.data, tokenizer, recipe.train.seed)
        # The rows behind the first held-out examples, for the sample generations in the log.
        sample_rows = held_out_rows(recipe.data, eval_set[:recipe.train.sample_count])
    if not len(train_set):  # every rank alike; with the counts that say why (the data table is not printed)
        raise DataError(no_training_examples(stats, recipe.data))
    token_counts = train_set.trained_tokens()
    plan = BatchPlan(len(train_set), recipe.train.global_batch_size, recipe.train.seed)
    return TrainingData(train_set, eval_set, stats, sample_rows, token_counts, plan)


def prepare_model(recipe: Recipe, device: torch.device, tokenizer) -> tuple[torch.nn.Module, torch.dtype]:
    """The frozen quantised base with LoRA adapters, and the speed-ups the recipe asks for."""
    model, dtype = load_base(recipe, device)
    check_embedding_rows(tokenizer, model.get_input_embeddings().num_embeddings)
    # Same seed on every rank, so every rank starts from identical A matrices.
    torch.manual_seed(recipe.train.seed)
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha,
               recipe.lora.dropout, recipe.lora.rslora, recipe.lora.dora)
    switched = speedups.apply(model, recipe, device)
    if switched and distributed.is_main():
        print(f"speed-ups: {', '.join(switched)}", flush=True)
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, dtype


def prepare_engine(recipe: Recipe, model: torch.nn.Module, ds_config: dict) -> tuple[torch.nn.Module, object,
                                                                                    torch.optim.Optimizer]:
    """DeepSpeed around the loss, with `ds_config` from deepspeed_config (built in `setup`,
    which a dry run checks too). Only adapter parameters go to the optimizer: ZeRO then shards just
    their (small) state, and the frozen quantised base is replicated on every rank (stages 0-2) or
    partitioned (stage 3)."""
    import deepspeed

    loss_model = CausalLMLoss(model)
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.lora.plus_ratio), lr=recipe.train.learning_rate,
                                  weight_decay=recipe.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=loss_model, optimizer=optimizer, config=ds_config)
    return loss_model, engine, optimizer


def restore(recipe: Recipe, resume_dir: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            engine, n_train: int, held_out: str, log: Callable[[str], None]) -> TrainState:
    """The counters, optimizer moments and RNG streams of the checkpoint resumed from, or a fresh start."""
    if resume_dir is None:
        return TrainState(global_batch_size=recipe.train.global_batch_size, world_size=distributed.world_size())
    state = resume.restore_training_state(resume_dir, model, optimizer, engine.optimizer)
    if state.train_examples and state.train_examples != n_train and distributed.is_main():
        # The held-out split is a seeded draw over each dataset's row count: new rows draw it again.
        warnings.warn(f"{resume_dir} was trained on {state.train_examples:,} examples, this run has "
                      f"{n_train:,}: the data order from here differs from an uninterrupted run, and if a "
                      f"dataset's rows changed, so did the held-out split (rows held out before may now be "
                      f"trained on, and the other way round): held-out loss and the best checkpoint from "
                      f"here on are not comparable with those before the resume", TrainerWarning, stacklevel=2)
    if state.held_out is not None and state.held_out != held_out and state.best_step is not None:
        # Another max_seq_len, template setting, cap or split scores other examples: a loss on them
        # cannot beat or lose to the checkpoint's best, so the best is chosen afresh from here on.
        if distributed.is_main():
            warnings.warn(f"{resume_dir} scored its held-out loss on other held-out examples than this run "
                          f"(the data settings changed): the best checkpoint (step {state.best_step}, "
                          f"{state.best_eval_loss:.4f}) is not compared with the losses from here on; "
                          f"the best is chosen again among this run's evaluations", TrainerWarning, stacklevel=2)
        state.best_eval_loss = state.best_step = None
    log(f"resumed from {resume_dir} at step {state.step} (epoch {state.epoch}, "
        f"example {state.position_in_epoch} of {n_train})")
    return state


def train_step(run: Run, step: int, lr: float, stop_requested: Callable[[], bool],
               step_tokens: int) -> tuple[float, float | None, bool, list[int], bool]:
    """One optimizer step over the global batch. Returns the global loss, gradient norm, whether any
    rank asked to stop, (when the loss is not finite) the row ids of the offending micro-batches,
    and whether fp16 loss scaling skipped the update (an overflow). `stop_requested` is asked at the
    end of the step."""
    recipe, engine, rank, world = run.recipe, run.engine, distributed.rank(), distributed.world_size()
    skipped_before = engine.skipped_steps
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's group runs at plus_ratio x lr
    accumulation = recipe.gradient_accumulation_steps(world)
    # The loss is the token-weighted mean over the whole global batch: each micro-batch's sum is
    # divided by the step's total trained tokens (known from the plan on every rank), and rescaled
    # by what DeepSpeed divides by (accumulation x world size) when it averages gradients.
    micro_losses, micro_batches, own_grad_norm = [], [], None
    for micro_batch in run.data.plan.rank_micro_batches(step, rank, world, recipe.train.micro_batch_size):
        # On the CPU: CausalLMLoss reads what it needs there, then moves the tensors to the device.
        batch = run.collate([run.data.train_set[i] for i in micro_batch])
        try:
            loss_sum, _ = engine(**batch)
            engine.backward(loss_sum * (accumulation * world / step_tokens))
            if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
                # Without ZeRO, DeepSpeed clips the (already averaged) gradients but keeps no norm.
                own_grad_norm = adapter_gradient_norm(run.model)
            engine.step()
        except (RuntimeError, MemoryError) as error:
            if health.is_out_of_memory(error):
                raise health.TrainingHealthError(health.out_of_memory_message(error, step + 1)) from error
            raise
        micro_losses.append(loss_sum.detach())
        micro_batches.append(micro_batch)
    link_group_states(engine.optimizer)  # LoRA+: DeepSpeed links the second group's Adam state too early
    # The losses are read once per step, not per micro-batch: each read waits for the device.
    values = torch.stack(micro_losses).double().tolist() if micro_losses else []
    step_loss = sum(values)
    bad_rows = [run.data.train_set[i].row_id for value, micro_batch in zip(values, micro_batches)
                if not math.isfinite(value) for i in micro_batch]
    # One reduction carries the loss and whether any rank was asked to stop, so all ranks agree. The
    # flag is read here, not before the step: a signal that came during this step stops after it.
    total_loss, stops = distributed.sum_across_ranks([step_loss, float(stop_requested())], run.device)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else own_grad_norm
    if not math.isfinite(total_loss):
        bad_rows = [row for rows in distributed.gather_objects(bad_rows) for row in rows]
    elif grad_norm is not None and not math.isfinite(grad_norm):  # which micro-batch is not known
        bad_rows = [run.data.train_set[i].row_id for i in run.data.plan.indices(step)]
    # DeepSpeed's scaler decides on all ranks together, so every rank sees the same skip.
    overflowed = engine.fp16_enabled() and engine.skipped_steps > skipped_before
    return total_loss / step_tokens, grad_norm, bool(stops), bad_rows, overflowed


def adapter_gradient_norm(model: torch.nn.Module) -> float:
    """The 2-norm of the adapters' gradients held in `.grad` (no ZeRO: whole on every rank)."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in adapter_parameters(model).values()
                                                if p.grad is not None]))


def advance(state: TrainState, run: Run, loss: float, lr: float, started: float, step_tokens: int,
            skipped: bool) -> dict:
    """Move the counters and the data cursor past the step just taken; return its metrics record."""
    recipe = run.recipe
    state.tokens_seen += step_tokens
    state.examples_seen = state.step * recipe.train.global_batch_size
    state.epoch, state.position_in_epoch = divmod(state.examples_seen, len(run.data.train_set))
    state.global_batch_size, state.world_size = recipe.train.global_batch_size, distributed.world_size()
    state.train_examples = len(run.data.train_set)
    state.held_out = run.data.held_out_identity
    record = {"step": state.step, "loss": loss, "lr": lr, "epoch": round(run.data.plan.epoch(state.step), 4),
              "tokens_seen": state.tokens_seen, "step_time": round(time.perf_counter() - started, 4)}
    return {**record, "skipped": True} if skipped else record


def evaluate_held_out(run: Run, state: TrainState) -> dict:
    """The held-out loss and perplexity now; remembers the best step."""
    if not run.data.eval_set:
        return {}
    result = evaluate_loss(run.loss_model, run.data.eval_set, run.recipe.train.micro_batch_size,
                           run.tokenizer.pad_token_id, run.device)
    if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss, state.best_step = result["eval_loss"], state.step
    return result


def sample(run: Run, step: int, say: Callable[[str], None], dashboards: Dashboards) -> None:
    """Greedy answers to a few held-out questions: printed, appended to samples.jsonl, and in
    the dashboards (rank 0). Every rank decodes, since under ZeRO-3 each forward pass is a collective."""
    # Decoding runs in eval mode (no dropout) and greedy draws no random numbers; the fork keeps
    # the training RNG streams exactly where they were regardless, so runs stay bitwise resumable.
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Through the loss wrapper, which DeepSpeed wraps: under ZeRO-3 its hook resets the per-forward
        # parameter bookkeeping.
        samples = sample_generations(run.loss_model, run.tokenizer, run.data.sample_rows, run.recipe.data.template,
                                     SAMPLE_MAX_NEW_TOKENS, run.device,
                                     max_prompt_tokens=max(run.recipe.data.max_seq_len - SAMPLE_MAX_NEW_TOKENS, 1))
    if distributed.is_main():
        append_samples(Path(run.recipe.output_dir), step, samples)
        say(format_samples(step, samples))
        dashboards.write_samples(step, samples)
