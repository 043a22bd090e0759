"""The benchmark's reference: the same job as `launch/train.py RECIPE [overrides]`, trained by
transformers' Trainer with peft's LoRA on a bitsandbytes base, the standard QLoRA stack.

    python -m launch.benchmarks.hf_trainer RECIPE [section.key=value ...] --times PATH [--held-out PATH [--final-only]]

Everything that defines the job comes from our recipe and our code: the tokenised examples and
their prompt masking (`trainer.data.pipeline`), the order they are seen in (`BatchPlan`, fed through a
sequential sampler so every step holds the same examples as ours), the quantisation config and
compute dtype (`trainer.model.base`). What is theirs: the model forward and loss (logits over every
position), peft's LoRA layers, `prepare_model_for_kbit_training`, the Trainer loop and AdamW.
The learning rate follows our schedule (`trainer.loop.learning_rate`), and the adapters are
initialised after seeding torch with train.seed, as ours are.
Writes the wall-clock time at the end of every optimizer step to --times; with --held-out, the
held-out loss (token-weighted, as `trainer.evaluation.held_out_loss`) before training and wherever ours evaluates
(--final-only: after the last step only, as the bench scores it).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from trainer.config import Recipe, TrainConfig
from trainer.recipe_loading import load_recipe
from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.batching import BatchPlan, collate
from trainer.data.pipeline import build_datasets
from trainer.loop import learning_rate
from trainer.model.base import compute_dtype, load_tokenizer, quantization_config, resolve_base
from trainer.model.base_fixes import keep_4bit_layout


class RecipeScheduleTrainer(Trainer):
    """Trainer whose learning rate is ours, step for step (its "cosine" starts warmup at 0 and has no floor)."""

    def __init__(self, *args, train_config: TrainConfig, **kwargs):
        self.train_config = train_config
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            train = self.train_config
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: learning_rate(step, train) / train.learning_rate)
            self._created_lr_scheduler = True
        return self.lr_scheduler


class HeldOutLoss(TrainerCallback):
    """The held-out loss before training and at every eval_every-th (and the last) step, as ours
    logs it: summed token losses over all examples / trained tokens (Trainer's eval_loss would
    average per batch)."""

    def __init__(self, examples: list[Example], train: TrainConfig, pad_token_id: int, device: torch.device,
                 before_training: bool = True):
        self.examples, self.train, self.pad_token_id, self.device = examples, train, pad_token_id, device
        self.before_training = before_training
        self.losses: dict[int, dict[str, float]] = {}
        self.train_losses: dict[int, float] = {}  # Trainer's logged loss per step (train.log_every=1)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time its layer runs
        # in eval mode without gradients, and from then on computes that layer in bf16 with no gradient
        # to its input: one evaluation would change how this side trains. Ours turns that off the same way.
        keep_4bit_layout(model)
        if self.before_training:
            self.losses[0] = held_out_loss(model, self.examples, self.train.micro_batch_size, self.pad_token_id,
                                           self.device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_losses[state.global_step] = logs["loss"]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.train.eval_every == 0 or state.global_step == self.train.max_steps:
            self.losses[state.global_step] = held_out_loss(model, self.examples, self.train.micro_batch_size,
                                                           self.pad_token_id, self.device)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: list[Example], micro_batch: int, pad_token_id: int,
                  device: torch.device) -> dict[str, float]:
    """Summed cross-entropy over the response tokens of `examples` / their number, from the model's logits."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), micro_batch):
        batch = collate(examples[start:start + micro_batch], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        targets = batch["labels"][:, 1:].to(device)
        loss_sum += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), "eval_tokens": tokens}


def step_end_times(recipe: Recipe, device: torch.device, callbacks: tuple[TrainerCallback, ...] = ()) -> list[float]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, TrainingArguments

    base = resolve_base(recipe)
    tokenizer = load_tokenizer(base, recipe)
    train_set, _, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    plan = BatchPlan(len(train_set), recipe.train.global_batch_size, recipe.train.seed)
    ordered = [train_set[i] for step in range(recipe.train.max_steps) for i in plan.indices(step)]

    def collate_examples(examples):
        batch = collate(examples, tokenizer.pad_token_id)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    dtype = compute_dtype(recipe, device)
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization_config(recipe, dtype), dtype=dtype,
        attn_implementation=recipe.model.attn_implementation, device_map={"": device})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=recipe.train.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = recipe.lora
    torch.manual_seed(recipe.train.seed)
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.rslora, bias="none", task_type="CAUSAL_LM"))

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():  # the step's kernels have finished, not merely been queued
                torch.cuda.synchronize()
            self.times.append(time.time())

    train = recipe.train
    times = StepTimes()
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=train.max_steps, per_device_train_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps(1),
            learning_rate=train.learning_rate, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
            lr_scheduler_type="cosine", max_grad_norm=train.grad_clip, optim="adamw_torch", seed=train.seed,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type == "cpu",
            train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=False,
            logging_steps=train.log_every, save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True)
        trainer = RecipeScheduleTrainer(model=model, args=args, train_dataset=ordered, data_collator=collate_examples,
                                        callbacks=[times, *callbacks], train_config=train)
        trainer.train()
    return times.times


def main(argv: list[str]) -> None:
    options = {flag: argv[argv.index(flag) + 1] for flag in ("--times", "--held-out") if flag in argv}
    final_only = "--final-only" in argv
    argv = [a for a in argv if a != "--final-only"]
    arguments = [a for i, a in enumerate(argv) if a not in options and (i == 0 or argv[i - 1] not in options)]
    recipe = load_recipe(arguments[0], arguments[1:])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    held_out = None
    if "--held-out" in options:
        tokenizer = load_tokenizer(resolve_base(recipe), recipe)
        _, eval_set, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
        held_out = HeldOutLoss(eval_set, recipe.train, tokenizer.pad_token_id, device, before_training=not final_only)
    times = step_end_times(recipe, device, (held_out,) if held_out else ())
    with open(options["--times"], "w") as handle:
        json.dump(times, handle)
    if held_out:
        with open(options["--held-out"], "w") as handle:
            json.dump({"held_out": held_out.losses, "train_loss": held_out.train_losses}, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
