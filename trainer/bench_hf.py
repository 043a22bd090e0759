"""The benchmark's reference: the same job as `launch/train.py RECIPE [overrides]`, trained by
transformers' Trainer with peft's LoRA on a bitsandbytes base, the standard QLoRA stack.

    python -m trainer.bench_hf RECIPE [section.key=value ...] --times PATH

Everything that defines the job comes from our recipe and our code: the tokenised examples and
their prompt masking (`trainer.data`), the order they are seen in (`BatchPlan`, fed through a
sequential sampler so every step holds the same examples as ours), the quantisation config and
compute dtype (`trainer.model`). What is theirs: the model forward and loss (logits over every
position), peft's LoRA layers, `prepare_model_for_kbit_training`, the Trainer loop and AdamW.
Writes the wall-clock time at the end of every optimizer step to --times.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import torch

from trainer.config import Recipe, load_recipe
from trainer.data import BatchPlan, build_datasets, collate
from trainer.model import compute_dtype, load_tokenizer, quantization_config, resolve_base


def step_end_times(recipe: Recipe, device: torch.device) -> list[float]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

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
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.rslora, bias="none", task_type="CAUSAL_LM"))

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
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
        trainer = Trainer(model=model, args=args, train_dataset=ordered, data_collator=collate_examples,
                          callbacks=[times])
        trainer.train()
    return times.times


def main(argv: list[str]) -> None:
    times_path = argv[argv.index("--times") + 1]
    arguments = [a for i, a in enumerate(argv) if a != "--times" and (i == 0 or argv[i - 1] != "--times")]
    recipe = load_recipe(arguments[0], arguments[1:])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with open(times_path, "w") as handle:
        json.dump(step_end_times(recipe, device), handle)


if __name__ == "__main__":
    main(sys.argv[1:])
