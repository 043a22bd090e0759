"""The training loop, top to bottom: seed, base, adapters, data, engine, restore, then step."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer import checkpoint, distributed, resume
from trainer.checkpoint import TrainState
from trainer.config import Recipe, TrainConfig, deepspeed_config
from trainer.data import BatchPlan, build_datasets, collate
from trainer.evaluate import evaluate_loss
from trainer.lora import adapter_parameters, apply_lora, parameter_summary
from trainer.loss import CausalLMLoss
from trainer.metrics import MetricsLog
from trainer.model import load_base, load_tokenizer, resolve_base
from trainer.signals import StopRequest


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


def train(recipe: Recipe) -> TrainState:
    import deepspeed

    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    output_dir = Path(recipe.output_dir)
    log = print if distributed.is_main() else (lambda *a, **k: None)
    seed_everything(recipe.train.seed)

    # Base and tokenizer. Rank 0 goes first so a built-in base is created once.
    with distributed.main_first():
        base_name_or_path = resolve_base(recipe)
        tokenizer = load_tokenizer(base_name_or_path, recipe)
    model, dtype = load_base(recipe, device)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().num_embeddings}")

    # Adapters: same seed on every rank, so every rank starts from identical A matrices.
    torch.manual_seed(recipe.train.seed)
    apply_lora(model, recipe.lora.target_modules, recipe.lora.r, recipe.lora.alpha,
               recipe.lora.dropout, recipe.lora.rslora)
    log(parameter_summary(model))

    with distributed.main_first():
        train_set, eval_set, data_stats = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    log(f"data: {data_stats}")
    plan = BatchPlan(len(train_set), recipe.train.global_batch_size, recipe.train.seed)
    token_counts = [sum(label != -100 for label in e.labels[1:]) for e in train_set]

    resume_dir = resume.find_resume_dir(recipe)
    if resume_dir is not None:
        resume.check_compatible(resume_dir, recipe)
        resume.load_into_model(model, resume_dir)

    # Only adapter parameters go to the optimizer: ZeRO then shards just their (small) state, and
    # the frozen quantised base is replicated on every rank (stages 0-2) or partitioned (stage 3).
    loss_model = CausalLMLoss(model)
    optimizer = torch.optim.AdamW(list(adapter_parameters(model).values()), lr=recipe.train.learning_rate,
                                  weight_decay=recipe.train.weight_decay)
    ds_config = deepspeed_config(recipe, world, str(dtype).removeprefix("torch."))
    engine, *_ = deepspeed.initialize(model=loss_model, optimizer=optimizer, config=ds_config)
    accumulation = recipe.gradient_accumulation_steps(world)

    state = TrainState(global_batch_size=recipe.train.global_batch_size, world_size=world)
    if resume_dir is not None:
        state = resume.restore_training_state(resume_dir, model, optimizer, engine.optimizer)
        log(f"resumed from {resume_dir} at step {state.step} (epoch {state.epoch}, "
            f"example {state.position_in_epoch} of {len(train_set)})")

    metrics = MetricsLog(output_dir)
    meta = {"base_model": base_name_or_path, "quant_bits": recipe.quant.bits,
            "template": recipe.data.template, "world_size": world, "zero_stage": recipe.deepspeed.zero_stage}
    progress = tqdm(total=recipe.train.max_steps, initial=state.step, disable=rank != 0,
                    desc="train", dynamic_ncols=True)
    stop_request = StopRequest()  # SIGTERM / SIGINT: save at the next step boundary, exit cleanly
    engine.train()
    while state.step < recipe.train.max_steps:
        started = time.perf_counter()
        lr = learning_rate(state.step, recipe.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The loss is the token-weighted mean over the whole global batch: each micro-batch's sum
        # is divided by the step's total trained tokens (known from the plan on every rank), and
        # rescaled by what DeepSpeed divides by (accumulation x world size) when it averages.
        step_tokens = sum(token_counts[i] for i in plan.indices(state.step))
        step_loss = 0.0
        for micro_batch in plan.rank_micro_batches(state.step, rank, world, recipe.train.micro_batch_size):
            batch = {k: v.to(device) for k, v in collate([train_set[i] for i in micro_batch],
                                                          tokenizer.pad_token_id).items()}
            loss_sum, _ = engine(**batch)
            engine.backward(loss_sum * (accumulation * world / step_tokens))
            engine.step()
            step_loss += loss_sum.item()
        state.step += 1
        state.tokens_seen += step_tokens
        state.examples_seen = state.step * recipe.train.global_batch_size
        state.epoch, state.position_in_epoch = divmod(state.examples_seen, len(train_set))
        state.global_batch_size, state.world_size = recipe.train.global_batch_size, world
        # One reduction carries the loss and whether any rank was asked to stop, so all ranks agree.
        total_loss, stops = distributed.sum_across_ranks([step_loss, float(stop_request.requested)], device)
        loss = total_loss / step_tokens
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        record = {"step": state.step, "loss": loss, "lr": lr, "epoch": round(plan.epoch(state.step), 4),
                  "tokens_seen": state.tokens_seen, "step_time": round(time.perf_counter() - started, 4)}

        last = state.step == recipe.train.max_steps
        if state.step % recipe.train.eval_every == 0 or last:
            record.update(evaluate_loss(loss_model, eval_set, recipe.train.micro_batch_size,
                                        tokenizer.pad_token_id, device) if eval_set else {})
            if "eval_loss" in record and (state.best_eval_loss is None or record["eval_loss"] < state.best_eval_loss):
                state.best_eval_loss, state.best_step = record["eval_loss"], state.step
            if "eval_loss" in record:
                progress.write(f"step {state.step}: loss {loss:.4f}  eval_loss {record['eval_loss']:.4f}  "
                               f"eval_ppl {record['eval_ppl']:.2f}") if rank == 0 else None
        if state.step % recipe.train.log_every == 0 or "eval_loss" in record or last:
            metrics.write(record)
        if state.step % recipe.train.save_every == 0 or last or stops:
            saved = checkpoint.save(output_dir, model, optimizer, recipe, base_name_or_path, state, meta)
            if saved is not None:
                progress.write(f"saved {saved}")
        if stops and not last:
            progress.write(f"stopping at step {state.step} as asked ({stop_request.signal_name}); "
                           f"continue with resume=auto") if rank == 0 else None
            break
    progress.close()
    metrics.close()
    stop_request.restore()
    return state
