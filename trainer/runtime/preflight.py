"""The preflight summary printed before step 1 (and by `--dry-run`): what is about to run."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.config import Recipe, TrainConfig
from trainer.model.base import dtype_name
from trainer.model.adapters import adapter_parameters, lora_layers
from trainer.runtime.deepspeed_config import zero_stage_to_run


def memory_estimate(recipe: Recipe, model: nn.Module, world: int, dtype: torch.dtype) -> dict[str, float]:
    """A rough per-rank estimate in GiB: base weights, adapter training state, activations."""
    config = model.config
    element = torch.finfo(dtype).bits / 8
    # Storage bytes are exact whatever the format: a packed 4-bit weight is a small uint8 tensor.
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    if recipe.deepspeed.zero_stage == 3:
        base /= world
    adapter = sum(p.numel() for p in adapter_parameters(model).values())
    # fp32 weight + gradient + two Adam moments; ZeRO-1/2/3 shard the optimizer state (and 2/3 gradients).
    optimizer_share = 1 / world if zero_stage_to_run(recipe, world, dtype_name(dtype)) >= 1 else 1
    adapter_bytes = adapter * 4 * (1 + 1 + 2 * optimizer_share)
    # Per token and layer, a decoder keeps roughly 34 x hidden activations for backward (fewer with
    # activation checkpointing, which keeps only the layer inputs).
    per_token_layer = (2 if recipe.train.activation_checkpointing else 34) * config.hidden_size * element
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    activations = tokens * config.num_hidden_layers * per_token_layer
    gib = 2**30
    return {"base": base / gib, "adapter_state": adapter_bytes / gib, "activations": activations / gib,
            "total": (base + adapter_bytes + activations) / gib}


def summary(recipe: Recipe, model: nn.Module, data_stats: dict, world: int, dtype: torch.dtype,
            base_name_or_path: str, resume_dir: Path | None, mean_tokens: float) -> str:
    quant = recipe.quant
    quantisation = ("none" if quant.bits == 16 else "8-bit" if quant.bits == 8 else
                    f"4-bit {quant.quant_type}{' + double quant' if quant.double_quant else ''}")
    trainable = sum(p.numel() for p in adapter_parameters(model).values())
    memory = memory_estimate(recipe, model, world, dtype)
    accumulation = recipe.gradient_accumulation_steps(world)
    lines = [
        ("model", f"{recipe.model.name_or_path} -> {base_name_or_path}"),
        ("compute dtype", dtype_name(dtype)),
        ("quantisation", quantisation),
        ("LoRA", f"r={recipe.lora.r} alpha={recipe.lora.alpha:g} dropout={recipe.lora.dropout:g} on "
                 f"{', '.join(recipe.lora.target_modules)} ({len(lora_layers(model))} layers)"
                 + (" rsLoRA" if recipe.lora.rslora else "") + (" DoRA" if recipe.lora.dora else "")
                 + (f" LoRA+ (B at {recipe.lora.plus_ratio:g}x lr)" if recipe.lora.plus_ratio != 1 else "")),
        ("trainable parameters", f"{trainable:,}"),
        ("DeepSpeed", _zero_line(recipe, world, dtype_name(dtype))),
        ("batch", f"global {recipe.train.global_batch_size} = micro {recipe.train.micro_batch_size} x "
                  f"accumulation {accumulation} x {world} ranks"),
        ("tokens per step", f"~{mean_tokens * recipe.train.global_batch_size:,.0f} "
                            f"(mean {mean_tokens:.0f} per example)"),
        ("data", ", ".join(f"{k} {v}" for k, v in data_stats.items() if not isinstance(v, (dict, list)))),
        ("steps", f"{recipe.train.max_steps} (eval every {recipe.train.eval_every}, save every "
                  f"{recipe.train.save_every})"),
        ("learning rate", schedule_line(recipe.train)),
        ("output_dir", str(Path(recipe.output_dir).resolve())),
        ("resume from", str(resume_dir) if resume_dir else "nothing (fresh start)"),
        ("memory per rank", f"~{memory['total']:.2f} GiB (base {memory['base']:.2f}, adapter state "
                            f"{memory['adapter_state']:.3f}, activations {memory['activations']:.2f}; rough)"),
    ]
    width = max(len(key) for key, _ in lines)
    return "preflight\n" + "\n".join(f"  {key:<{width}}  {value}" for key, value in lines)


def schedule_line(train: TrainConfig) -> str:
    """The learning-rate schedule in words (trainer/loop.py learning_rate), saying so where the warmup
    lasts the whole run: the rate then only rises (reaching train.learning_rate at the last step at
    most), and never decays."""
    peak, warmup, steps = train.learning_rate, train.warmup_steps, train.max_steps
    if warmup == steps:
        return (f"{peak:g} after train.warmup_steps={warmup}, a warmup as long as the run: the rate rises to "
                f"{peak:g} at the last step and never decays (set train.warmup_steps below {steps})")
    if warmup > steps:
        return (f"{peak:g} after train.warmup_steps={warmup}, a warmup longer than the run's {steps} steps: the "
                f"rate only rises, to {steps / warmup:.0%} of {peak:g} at the last step (set train.warmup_steps "
                f"below {steps})")
    warmup_text = f"linear warmup over {warmup} steps, then " if warmup else ""
    # Step s (1-based) trains at loop.learning_rate(s - 1): the floor is where step steps + 1 would be.
    return f"{peak:g}: {warmup_text}cosine to {peak * train.min_lr_ratio:g} after the last step ({steps})"


def _zero_line(recipe: Recipe, world: int, precision: str) -> str:
    stage, running = recipe.deepspeed.zero_stage, zero_stage_to_run(recipe, world, precision)
    if running != stage:
        return f"ZeRO-{stage} asked, run as ZeRO-{running} (one rank: nothing to shard), world size {world}"
    return f"ZeRO-{stage}, world size {world}"
