"""The training loop, top to bottom: `setup` (trainer/setup.py) builds the run, then steps:
micro-batches, backward, optimizer step; log, evaluate, sample and save every N."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.checkpoint import reading, saving
from trainer.checkpoint.best import complete_checkpoints
from trainer.checkpoint.saving import TrainState
from trainer.checkpoint.snapshot import UpdateSnapshot
from trainer.config import Recipe, TrainConfig
from trainer.data.pipeline import rows_by_file
from trainer.evaluation.generate import sample_generations
from trainer.evaluation.held_out_loss import evaluate_loss
from trainer.model.adapters import adapter_parameters, link_group_states
from trainer.runtime import distributed, health, run_dir
from trainer.runtime.dashboards import Dashboards
from trainer.runtime.metrics_log import MetricsLog
from trainer.runtime.report import append_samples, format_samples, write_report
from trainer.runtime.signals import StopRequest
from trainer.setup import Run, setup

SAMPLE_MAX_NEW_TOKENS = 48  # sample answers in the training log stay short: a glance, not an evaluation


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at max_steps. `step` counts from 0:
    optimizer step s (1-based, as logged) trains at learning_rate(s - 1), so the floor comes one past the
    last step (as in transformers' cosine schedule)."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return train.learning_rate * (train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine)


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
            # Every rank is here at this step (the check is on all-reduced values); rank 0's folder is the one
            # resume=auto reads (a node-local output_dir elsewhere holds none).
            checkpoints = Path(run.recipe.output_dir) / "checkpoints"
            saved = reading.on_main(lambda: [path.name for path in complete_checkpoints(checkpoints)])
            raise health.TrainingHealthError(health.nonfinite_message(
                step, lr, loss, grad_norm, rows_by_file(run.data.train_set, run.recipe.data, bad_rows),
                skips=self.nonfinite - 1 if snapshot is not None else None,
                checkpoint=saved[-1] if saved else None))
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
