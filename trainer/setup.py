"""Building a run, in the order the user's data flows: what the recipe and world size alone decide
(batch sizes, the DeepSpeed config), tokenizer, the checkpoint to resume from, data, base + adapters +
speed-ups, engine, restored state. `setup` returns the `Run` that trainer/loop.py steps."""
from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import speedups
from trainer.checkpoint import reading, resume
from trainer.checkpoint.fingerprint import base_fingerprint
from trainer.checkpoint.saving import TrainState
from trainer.config import Recipe, RecipeError
from trainer.runtime.deepspeed_config import check_deepspeed_config, deepspeed_config
from trainer.data.batching import BatchPlan
from trainer.data.examples import examples_identity
from trainer.data.formats import DataError
from trainer.data.packing import training_collate
from trainer.data.pipeline import build_datasets, held_out_rows
from trainer.data.stats import DataStats, chat_rendered, no_training_examples
from trainer.data.store import Examples
from trainer.loss import CausalLMLoss, logit_transform
from trainer.model.base import (check_embedding_rows, compute_dtype, dtype_name, enable_activation_checkpointing,
                                load_base, load_tokenizer, resolve_base)
from trainer.model.adapters import optimizer_groups, parameter_summary
from trainer.model.lora import apply_lora
from trainer.runtime import distributed, preflight, run_dir
from trainer.runtime.quiet import TrainerWarning
from trainer.runtime.dashboards import check_wandb_login


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
        """What the held-out loss is scored on (`examples_identity`): a resume compares it with the
        checkpoint's before comparing losses."""
        return examples_identity(self.eval_set)

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
