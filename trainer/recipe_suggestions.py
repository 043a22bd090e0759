"""The key a user most likely meant by an unknown recipe key or script option: another trainer's name
for one of ours (`SYNONYMS`), a key of another section, or the nearest spelling (`meant_key`)."""
from __future__ import annotations

import dataclasses
import difflib
import typing

from trainer.config import Recipe


# Other trainers' names (axolotl, HF Trainer, peft, LLaMA-Factory, torchtune) for our keys, by the key
# they mean here: a newcomer's `lora.rank` or `lr` is closest in spelling to lora.dora or lora, which
# they never meant. Where our concept differs, the entry says how ours works instead.
SYNONYMS = {
    **dict.fromkeys(("rank", "lora_r", "lora_rank"), "lora.r"),
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    **dict.fromkeys(("lora_target", "lora_target_modules"), "lora.target_modules"),
    "use_dora": "lora.dora", "use_rslora": "lora.rslora", "loraplus_lr_ratio": "lora.plus_ratio",
    **dict.fromkeys(("base_model", "model_name", "model_id", "model_name_or_path",
                     "pretrained_model_name_or_path"), "model.name_or_path"),
    **dict.fromkeys(("torch_dtype", "bf16", "fp16"), "model.dtype"),
    **dict.fromkeys(("load_in_4bit", "load_in_8bit", "quantization_bit"),
                    "the base's quantisation is quant.bits (4, 8, or 16 for none)"),
    "bnb_4bit_quant_type": "quant.quant_type", "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype", "bnb_4bit_quant_storage": "quant.quant_storage",
    **dict.fromkeys(("dataset", "dataset_path", "data_path", "train_file"), "data.path"),
    "datasets": "one dataset is data.path; several are data.mixture",
    **dict.fromkeys(("sequence_len", "seq_len", "max_seq_length", "max_length", "cutoff_len", "model_max_length"),
                    "data.max_seq_len"),
    **dict.fromkeys(("val_set_size", "val_size", "test_size"), "data.eval_fraction"),
    **dict.fromkeys(("validation_file", "eval_dataset"), "data.eval_path"),
    "max_samples": "data.max_rows", "train_on_inputs": "data.train_on_prompt", "sample_packing": "data.packing",
    **dict.fromkeys(("prompt_template", "chat_template"), "data.template"),
    "lr": "train.learning_rate",
    **dict.fromkeys(("epochs", "num_epochs", "num_train_epochs", "max_epochs"),
                    "this trainer counts optimizer steps: train.max_steps"),
    **dict.fromkeys(("num_steps", "max_train_steps", "total_steps"), "train.max_steps"),
    **dict.fromkeys(("batch_size", "per_device_train_batch_size"),
                    "examples per forward pass on one rank are train.micro_batch_size, "
                    "per optimizer step train.global_batch_size"),
    "gradient_accumulation_steps": "accumulation is derived (global batch / micro batch x ranks): "
                                   "set train.global_batch_size",
    **dict.fromkeys(("max_grad_norm", "gradient_clipping", "clip_grad_norm"), "train.grad_clip"),
    "warmup_ratio": "warmup is counted in optimizer steps: train.warmup_steps",
    **dict.fromkeys(("lr_scheduler", "lr_scheduler_type"),
                    "the schedule is cosine after a linear warmup: train.warmup_steps, train.min_lr_ratio"),
    **dict.fromkeys(("optimizer", "optim"), "the optimizer is AdamW: train.learning_rate, train.weight_decay"),
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    **dict.fromkeys(("gradient_checkpointing", "enable_activation_checkpointing"), "train.activation_checkpointing"),
    "run_name": "train.wandb_run_name", "flash_attention": "model.attn_implementation",
    "resume_from_checkpoint": "resume",
}

# In the data section and data.mixture's entries (axolotl's `datasets: [{path: ..., type: alpaca}]`).
DATA_FORMAT_NAMES = ("type", "ds_type", "dataset_type", "formatting")


def meant_key(key: str, prefix: str, names: list[str]) -> str:
    """What an unknown `key` (in the section `prefix`, whose keys are `names`) most likely means, as the
    end of its error: another trainer's name for one of ours, else the nearest key of its own section or,
    spelled closer, of any section (`train.max_seq_len` is data.max_seq_len), else the section's keys."""
    if prefix.startswith("data.") and key.lower() in DATA_FORMAT_NAMES:  # axolotl: datasets: [{path, type}]
        return f"did you mean {prefix}format? (auto, alpaca, instances or chat)"
    meant = SYNONYMS.get(key.lower())
    if meant is not None:  # a key, or a sentence where our concept differs
        return meant if " " in meant else f"did you mean {meant}?"

    if prefix and dataclasses.is_dataclass(typing.get_type_hints(Recipe).get(key)):  # `train.lora=`
        return f"{key} is a section of its own: {key}.<key>=..."

    def likeness(candidate: str) -> float:
        return difflib.SequenceMatcher(None, key.lower(), candidate.rsplit(".", 1)[-1].lower()).ratio()

    own = max((f"{prefix}{name}" for name in names), key=likeness)
    elsewhere = max(recipe_key_names(), key=likeness)
    # A key of another section must be spelled closer than any of the section's own, and close: loosely
    # alike names across sections (temperature, template) are more often unrelated than misplaced.
    if likeness(elsewhere) >= 0.8 and likeness(elsewhere) > likeness(own):
        return f"did you mean {elsewhere}?"
    return f"did you mean {own}?" if likeness(own) >= 0.5 else f"valid keys: {', '.join(names)}"


def recipe_key_names() -> list[str]:
    """Every key of a recipe, as section.key or a top-level key."""
    keys = []
    for name, kind in typing.get_type_hints(Recipe).items():
        keys += [f"{name}.{field}" for field in typing.get_type_hints(kind)] if dataclasses.is_dataclass(kind) else [name]
    return keys
