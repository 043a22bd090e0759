"""Recipes: YAML mapped onto typed dataclasses, with overrides and derived values.

Every default lives here, once. The loop reads fields, never `dict.get(key, default)`.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe or override that cannot be turned into a valid config."""


# transformers 5's attention implementations (modeling_utils.get_correct_attn_implementation); a hub kernel
# ("org/repo", "org/repo@rev:name") is accepted as transformers reads it.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                             "flex_attention", "paged|eager")
HUB_KERNEL = re.compile(r"[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?")
PACKED_ATTENTION = "packed_sdpa"  # what trainer/speedups/packed_attention.py switches an sdpa model to
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters wandb.init refuses in a project name (wandb_settings.validate_project)
COLLECTIVE_TIMEOUT_MAX_MINUTES = 7 * 24 * 60


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"  # hub id, local dir, or builtin:<name>
    dtype: str = "auto"  # compute dtype: auto (fp32 on CPU; bf16 on a GPU that has it, else fp16) | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2/3/4 | flex_attention | a hub kernel
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class QuantConfig:
    bits: int = 4  # 4 | 8 | 16 (16 = no quantisation, base kept in model.dtype)
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    quant_storage: str = "auto"  # auto: uint8, or model.dtype under ZeRO-3
    # The 4-bit layers' products (bitsandbytes' bnb_4bit_compute_dtype; unused at 8 and 16 bits): auto =
    # model.dtype. bfloat16 under an fp32 model: the frozen base's products take bf16 inputs and give
    # bf16-rounded outputs (fp32 sums), returned in fp32; everything else stays fp32.
    compute_dtype: str = "auto"  # auto | float32 | bfloat16


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    dora: bool = False  # DoRA: a trained magnitude per output row times the normalised W + scaling * B @ A
    plus_ratio: float = 1.0  # LoRA+: B's learning rate = plus_ratio x A's (the paper suggests 16); 1 = plain


@dataclass
class DataSource:
    """One dataset of `data.mixture`."""
    path: str = ""  # as data.path
    weight: float = 1.0  # train rows used = weight x its train rows: 0.5 a seeded half, 2 every row twice
    split: str = "train"  # as data.split
    format: str = "auto"  # as data.format
    columns: dict[str, str] = field(default_factory=dict)  # as data.columns


@dataclass
class DataConfig:
    path: str = "builtin:tasks"  # json/jsonl/csv/parquet file, saved `datasets` dir, hub id, or builtin:<name>
    split: str = "train"  # split of a hub dataset
    format: str = "auto"  # auto (from the columns) | alpaca | instances | chat
    columns: dict[str, str] = field(default_factory=dict)  # dataset column -> our field, e.g. {response: output}
    mixture: list[DataSource] = field(default_factory=list)  # several datasets; replaces path/split/format/columns
    template: str = "alpaca"  # alpaca | plain | chat | a string with {instruction} and {input}
    max_seq_len: int = 512
    on_too_long: str = "truncate_prompt"  # truncate_prompt (cut the prompt's start) | drop | error
    on_bad_row: str = "error"  # error | skip (skipped rows are counted in the stats)
    eval_fraction: float = 0.05  # held-out fraction, used when eval_path is empty
    eval_path: str | None = None  # separate held-out file
    max_eval_rows: int = 500
    drop_leaked: bool = True  # drop training rows whose instruction + input (normalised) is a held-out one
    train_on_prompt: bool = False  # False: labels are -100 on prompt tokens
    max_rows: int | None = None  # cap on rows read per dataset (debugging, benchmarks); a stream stops there
    streaming: bool = False  # read hub datasets as a stream into the store, never downloaded whole (local files: no effect)
    cache: bool = True  # reuse tokenised datasets from <cache dir>/tokenized
    packing: bool = True  # pack several examples per row (attention isolated); loss unchanged


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 16  # examples per optimizer step, over all ranks
    micro_batch_size: int = 2  # examples per forward pass on one rank
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    keep_last: int | None = None  # prune older checkpoints, keeping the newest K
    activation_checkpointing: bool = False  # recompute decoder layers in backward (non-reentrant)
    fused_mlp: bool = True  # SwiGLU MLPs keep gate and up for the backward, not silu(gate) too (trainer/speedups/fused.py)
    fused_norm: bool = True  # RMSNorm as one autograd op with a four-pass backward (trainer/speedups/fused.py)
    fused_rotary: bool = True  # rotary embedding as one autograd op: fewer passes, same numbers (trainer/speedups/rotary.py)
    # q, k and v (frozen layers and their adapters) as one product in CPU training steps (trainer/speedups/projections.py;
    # with fused_rotary, whose attention forward runs it)
    fused_qkv: bool = True
    # packed examples' causal attention in CPU training as blocks of products, softmax kept for the backward
    # (trainer/speedups/blocked_attention.py; fp32, examples up to 512 tokens): faster than SDPA's kernel there
    blocked_attention: bool = True
    # The fused MLP's and norm's passes as single loops by torch.compile (trainer/speedups/compiled.py);
    # null (auto): on for CPU training of bases at least 512 wide (compiles once, cached on disk)
    compiled_kernels: bool | None = None
    onednn_matmul: bool = True  # frozen layers' fp32 CPU products by oneDNN, or MKL on Intel CPUs (trainer/speedups/onednn.py)
    report: bool = True  # report.png and the dashboards in report_to (false: neither; metrics.jsonl is always written)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard and/or wandb
    wandb_project: str = "qlora-trainer"  # Weights & Biases project
    wandb_run_name: str | None = None  # W&B run name (null: output_dir's name)
    wandb_mode: str = "offline"  # offline (files under output_dir/wandb; `wandb sync` uploads) | online
    sample_every: int = 100  # log greedy answers to a few held-out questions every N steps (0: only at the end)
    sample_count: int = 3  # held-out questions answered in that log (0: no samples)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    max_consecutive_skips: int = 5  # with on_nonfinite=skip, stop after this many skipped steps in a row
    collective_timeout_minutes: float = 30.0  # a lost rank ends the run after this long, not never


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # passed to DeepSpeed as is, merged last


# DeepSpeed keys that deepspeed_config derives from the recipe, and the recipe key each comes from:
# set in deepspeed.extra they would contradict it (4-bit storage, checkpoints and the loop follow the recipe).
RECIPE_OWNED_DEEPSPEED = {
    ("train_batch_size",): "train.global_batch_size", ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.global_batch_size / train.micro_batch_size",
    ("gradient_clipping",): "train.grad_clip", ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "offload_optimizer"): "deepspeed.offload_optimizer",
    ("zero_optimization", "offload_param"): "deepspeed.offload_param",
    ("bf16", "enabled"): "model.dtype", ("fp16", "enabled"): "model.dtype",
    ("optimizer",): "the loop's AdamW (train.learning_rate, train.weight_decay, lora.plus_ratio)",
    ("scheduler",): "the loop's cosine schedule (train.warmup_steps, train.min_lr_ratio)",
}


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "runs/default"
    resume: str | None = None  # checkpoint dir, or "auto" for the newest complete one

    def validate(self) -> None:
        _check(self.quant.bits in (4, 8, 16), "quant.bits", f"must be 4, 8 or 16, got {self.quant.bits}")
        _check(self.quant.quant_type in ("nf4", "fp4"), "quant.quant_type", "must be nf4 or fp4")
        _check(self.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
               "must be auto, float32, bfloat16 or float16")
        _check_attention(self.model.attn_implementation)
        # No float16: its products' gradients would underflow without the loss scaling that only an
        # fp16 model (model.dtype=float16) gets.
        _check(self.quant.compute_dtype in ("auto", "float32", "bfloat16"), "quant.compute_dtype",
               "must be auto, float32 or bfloat16 (for fp16 products set model.dtype=float16: it is loss-scaled)")
        _check(self.quant.quant_storage in ("auto", "uint8", "float16", "bfloat16", "float32"), "quant.quant_storage",
               "must be auto, uint8, float16, bfloat16 or float32")
        _check(self.lora.r > 0, "lora.r", "must be positive")
        # `< math.inf` refuses inf (and NaN, which fails every comparison): the messages say "finite" for it.
        _check(0 < self.lora.alpha < math.inf, "lora.alpha",
               f"must be a finite positive number (the update is scaled by alpha / r), got {self.lora.alpha}")
        _check(0.0 <= self.lora.dropout <= 0.99, "lora.dropout", "must be in [0, 0.99]")
        _check(len(self.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
        _check(0 < self.lora.plus_ratio < math.inf, "lora.plus_ratio",
               f"must be a finite positive number (1 = plain LoRA), got {self.lora.plus_ratio}")
        _check(self.data.template in ("alpaca", "plain", "chat") or "{instruction}" in self.data.template,
               "data.template", "must be alpaca, plain, chat, or a template string with {instruction}")
        # A custom template fills {instruction} and {input} only: another {name} would stay in every prompt as text.
        unknown = sorted(set(re.findall(r"\{([A-Za-z_]\w*)\}", self.data.template)) - {"instruction", "input"})
        _check(not unknown, "data.template",
               f"has {', '.join('{' + name + '}' for name in unknown)}: only {{instruction}} and {{input}} are filled "
               f"in (the response is appended after the template, so the template ends where the answer starts)")
        _check(self.data.on_too_long in ("truncate_prompt", "drop", "error"), "data.on_too_long",
               "must be truncate_prompt, drop or error")
        _check(self.data.on_bad_row in ("error", "skip"), "data.on_bad_row", "must be error or skip")
        formats = [self.data.format, *(source.format for source in self.data.mixture)]
        _check(all(f in ("auto", "alpaca", "instances", "chat") for f in formats), "data.format",
               "must be auto, alpaca, instances or chat (in data.mixture too)")
        for index, source in enumerate(self.data.mixture):
            _check(bool(source.path) and 0 < source.weight < math.inf, f"data.mixture[{index}]",
                   "needs a path and a finite weight > 0")
        _check(0.0 <= self.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        _check(self.data.max_seq_len >= 8, "data.max_seq_len", "must be at least 8")
        _check(self.data.max_eval_rows >= 0, "data.max_eval_rows", "must be 0 or more")
        _check(self.data.max_rows is None or self.data.max_rows > 0, "data.max_rows", "must be positive or null (no cap)")
        t = self.train
        _check(t.max_steps > 0, "train.max_steps", "must be positive")
        # numpy's legacy seeding (np.random.seed) takes [0, 2**32) only.
        _check(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {t.seed}")
        _check(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _check(t.global_batch_size > 0, "train.global_batch_size", "must be positive")
        for name in ("save_every", "eval_every", "log_every"):
            _check(getattr(t, name) > 0, f"train.{name}", "must be positive")
        _check(0 < t.learning_rate < math.inf, "train.learning_rate", f"must be a finite positive number, got {t.learning_rate}")
        _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio",
               "must be in [0, 1] (the cosine decays to learning_rate x min_lr_ratio)")
        _check(t.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
        _check(0 <= t.grad_clip < math.inf, "train.grad_clip",
               f"must be a finite number, 0 (no clipping) or more, got {t.grad_clip}")
        _check(0 <= t.weight_decay < math.inf, "train.weight_decay", f"must be a finite number, 0 or more, got {t.weight_decay}")
        _check(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", "must be 0 or more")
        _check(t.keep_last is None or t.keep_last > 0, "train.keep_last", "must be positive or null")
        _check(t.sample_every >= 0, "train.sample_every", "must be 0 or more")
        _check(t.sample_count >= 0, "train.sample_count", "must be 0 or more")
        _check(t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", "must be stop or skip")
        _check(set(t.report_to) <= {"tensorboard", "wandb"}, "train.report_to",
               f"must list tensorboard and/or wandb, got {t.report_to}")
        _check(t.wandb_mode in ("offline", "online"), "train.wandb_mode", "must be offline or online")
        _check(bool(t.wandb_project.strip()), "train.wandb_project", "must not be empty")
        # What wandb.init refuses, refused here, where a dry run sees it (not after the base loaded).
        _check("wandb" not in t.report_to
               or len(t.wandb_project) <= 128 and not set(t.wandb_project) & set(WANDB_PROJECT_FORBIDDEN),
               "train.wandb_project", f"must be at most 128 characters, none of {' '.join(WANDB_PROJECT_FORBIDDEN)} "
               f"(W&B refuses them; a team goes in WANDB_ENTITY, not here), got {t.wandb_project!r}")
        _check(0 < t.collective_timeout_minutes <= COLLECTIVE_TIMEOUT_MAX_MINUTES, "train.collective_timeout_minutes",
               f"must be positive and at most {COLLECTIVE_TIMEOUT_MAX_MINUTES} (a week), got {t.collective_timeout_minutes}")
        for path, owner in RECIPE_OWNED_DEEPSPEED.items():
            node = self.deepspeed.extra
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            _check(not (isinstance(node, dict) and path[-1] in node), f"deepspeed.extra.{'.'.join(path)}",
                   f"the recipe sets this through {owner}; change it there (here it would contradict what the run assumes)")
        ds = self.deepspeed
        # DeepSpeed reads offload_param under ZeRO-3 only, and offload_optimizer under ZeRO-1/2/3 only: elsewhere
        # it would be ignored without a word.
        _check(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param",
               f"DeepSpeed offloads parameters under ZeRO-3 only (deepspeed.zero_stage=3); at zero_stage="
               f"{ds.zero_stage} it would be ignored. Set deepspeed.offload_param=false, or deepspeed.zero_stage=3")
        _check(not ds.offload_optimizer or ds.zero_stage > 0, "deepspeed.offload_optimizer",
               "deepspeed.zero_stage=0 has no ZeRO optimizer to offload (it would be ignored). Set "
               "deepspeed.zero_stage=1, 2 or 3 (ZeRO-2 keeps it: one rank or many), or deepspeed.offload_optimizer=false")
        if self.quant.bits == 8 and self.deepspeed.zero_stage == 3:
            raise RecipeError(
                "quant.bits=8 with deepspeed.zero_stage=3 is not supported: ZeRO-3 partitions the int8 "
                "weights without their scale statistics, and training then runs on wrong weights with "
                "no error. Use quant.bits=4 (ZeRO-3 shards 4-bit weights stored in model.dtype) "
                "or deepspeed.zero_stage=2.")

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x world size = {self.train.micro_batch_size} x {world_size}. "
                f"Pick a global batch divisible by {per_step}, or change the micro batch.")
        return self.train.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {message}")


def _check_attention(name: str) -> None:
    """model.attn_implementation: a name transformers knows, checked here so a typo is named as one (from_pretrained's
    error would come after the data is read, and reads like a missing base)."""
    if name in ATTENTION_IMPLEMENTATIONS or HUB_KERNEL.fullmatch(name):
        return
    if name.startswith("paged|") and name.removeprefix("paged|") in ATTENTION_IMPLEMENTATIONS:  # continuous batching
        return
    if name == PACKED_ATTENTION:
        raise RecipeError(f"model.attn_implementation: {PACKED_ATTENTION} is switched on by the trainer itself over "
                          f"sdpa (packed rows, data.packing); set model.attn_implementation=sdpa")
    close = difflib.get_close_matches(name, ATTENTION_IMPLEMENTATIONS, n=1, cutoff=0.5)
    raise RecipeError(f"model.attn_implementation: unknown {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                      + f" (one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, or a hub kernel org/repo)")


def zero_stage_to_run(recipe: Recipe, world_size: int, precision: str) -> int:
    """The recipe's ZeRO stage, except 1 and 2 on a single rank in fp32 without offloading: they have
    nothing to shard there, and stage 0 skips their per-gradient bucket hooks (same numbers, ~2%
    faster on the CPU bench). Not in bf16/fp16, where DeepSpeed's stage 0 keeps its own fp32 master
    weights that our checkpoints do not read; not stage 3 (its loading and gathering is what a
    one-rank run may be testing). `precision` is the compute dtype name."""
    ds = recipe.deepspeed
    # With offload_optimizer the stage stays: stage 0 would drop the offloading the recipe asks for.
    if world_size == 1 and ds.zero_stage in (1, 2) and precision == "float32" and not ds.offload_optimizer:
        return 0
    return ds.zero_stage


def deepspeed_config(recipe: Recipe, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict, derived from the recipe once. `precision` is the compute dtype name."""
    ds = recipe.deepspeed
    stage = zero_stage_to_run(recipe, world_size, precision)
    if stage == 0 and precision != "float32":
        # Checked here, where `auto` has become a dtype (bf16 or fp16 on a GPU).
        raise RecipeError(
            f"deepspeed.zero_stage=0 with a {precision} compute dtype cannot resume exactly: DeepSpeed then "
            f"keeps the fp32 adapter weights and Adam moments inside its own mixed-precision optimizer, "
            f"where checkpoints cannot read them (they would hold adapters rounded to {precision} and no "
            f"optimizer moments). Use deepspeed.zero_stage=1 or 2 (on one rank they cost the same), or "
            f"model.dtype=float32.")
    zero: dict[str, Any] = {"stage": stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        # Gather the (small) adapter weights on save; the frozen base is never saved.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_batch_size": recipe.train.global_batch_size,
        "train_micro_batch_size_per_gpu": recipe.train.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps(world_size),
        "gradient_clipping": recipe.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bfloat16"},
        "fp16": {"enabled": precision == "float16"},
        "steps_per_print": 10**9,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        # We pass a torch AdamW; DeepSpeed would otherwise insist on its compiled CPU Adam when offloading.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if precision == "bfloat16":
        # Adapter gradients are reduced across ranks in fp32 rather than bf16 (8 bits of mantissa
        # would round away small gradients when summed over ranks); the adapters are small, so it
        # costs little. ZeRO-2/3 also accumulate them over micro-batches in fp32. Not ZeRO-1: there
        # fp32 accumulation swaps in DeepSpeed's BF16_Optimizer, which our checkpoints do not read.
        config["communication_data_type"] = "fp32"
        if stage in (2, 3):
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _deep_merge(config, ds.extra)


def check_deepspeed_config(config: dict[str, Any], extra: dict[str, Any]) -> None:
    """Refuse, as one line naming the key, what deepspeed.initialize would refuse with a pydantic traceback
    after the data and the base loaded: DeepSpeed's own config is built from `config` (deepspeed_config's
    dict, `extra` being deepspeed.extra, merged in). Call after the process group starts: DeepSpeed checks
    the batch sizes against its world size."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except ValidationError as error:
        raise RecipeError(_deepspeed_refusal(error, extra)) from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as error:
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"deepspeed.extra: DeepSpeed refused the config: {said}") from None


def _deepspeed_refusal(error: Any, extra: dict[str, Any]) -> str:
    """The first of a DeepSpeed pydantic model's complaints, named by its deepspeed.extra key."""
    first = error.errors()[0]
    where = tuple(str(part) for part in first["loc"])
    path = _path_ending_in(extra, where)
    key = "deepspeed.extra" + "".join(f".{part}" for part in (path or where))
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(where[-1], _deepspeed_option_names(error.title), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close and len(where) == 1 else " (check its spelling in DeepSpeed's docs)"
        return f"{key}: DeepSpeed has no such option{hint}"
    return f"{key}: DeepSpeed refused {first.get('input')!r}: {first['msg']}"


def _path_ending_in(tree: Any, where: tuple[str, ...]) -> tuple[str, ...] | None:
    """The shallowest key path in `tree` that ends in the keys `where`, or None."""
    if not isinstance(tree, dict):
        return None
    node = tree
    for part in where:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return where
    for key, value in tree.items():
        found = _path_ending_in(value, where)
        if found is not None:
            return (key, *found)
    return None


def _deepspeed_option_names(model_name: str) -> list[str]:
    """The option names (and their aliases) of the DeepSpeed config model called `model_name`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models = [DeepSpeedConfigModel]
    while models:
        model = models.pop()
        if model.__name__ == model_name:
            return [name for key, info in model.model_fields.items() for name in (key, info.alias) if name]
        models.extend(model.__subclasses__())
    return []


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- loading and overrides


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    try:
        for override in overrides:
            _apply_override(raw, override)
        recipe = _build(Recipe, raw, prefix="")
        recipe.validate()
    except UnquotedText as error:  # named with the text as written in the file: 1.10, not 1.1
        raise RecipeError(f"{path}: {UnquotedText(error.key, error.value, _source_text(text, error.key))}") from None
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
    return recipe


def _source_text(text: str, dotted: str) -> str | None:
    """The scalar at the key path `dotted` as written in the YAML `text`, or None."""
    node = yaml.compose(text)
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((value for key, value in node.value if key.value == part), None)
    return node.value if isinstance(node, yaml.ScalarNode) else None


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    recipe = _build(Recipe, raw, prefix="")
    recipe.validate()
    return recipe


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = OverrideText(text)  # read for its key's type in _coerce


class OverrideText(str):
    """A command-line override's value as typed. A text key takes it as it is (a '#' starts no comment,
    '1.10' is no number, '{instruction}' no mapping); quoted, as YAML reads the quotes ("a\\nb" has a
    newline). Any other key takes its YAML reading, so lists, numbers, booleans and null read naturally.
    A value inside a mapping (deepspeed.extra.X=, data.columns.X=) is read for the mapping's value type."""

    def read_as(self, kind: Any) -> Any:
        text = self.strip()
        if kind is str:
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                try:
                    quoted = yaml.safe_load(text)
                except yaml.YAMLError:
                    quoted = None
                return quoted if isinstance(quoted, str) else text[1:-1]
            return None if text in ("", "null", "~") else text
        try:
            return yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            return text


def _read_overrides(value: Any, kind: Any) -> Any:
    """`value` with every OverrideText inside it read as `kind` (a mapping's value type)."""
    if isinstance(value, OverrideText):
        return value.read_as(kind)
    if isinstance(value, dict):
        return {key: _read_overrides(item, kind) for key, item in value.items()}
    return value


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


def meant_key(key: str, prefix: str, names: list[str]) -> str:
    """What an unknown `key` (in the section `prefix`, whose keys are `names`) most likely means, as the
    end of its error: another trainer's name for one of ours, else the nearest key of its own section or,
    spelled closer, of any section (`train.max_seq_len` is data.max_seq_len), else the section's keys."""
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


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeError(f"unknown key {prefix}{key}; {meant_key(str(key), prefix, names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "", "~")):
            if type(None) in typing.get_args(kind):
                return None
        return _coerce(options[0], value, key)
    if isinstance(value, OverrideText):
        value = value.read_as(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value or {}, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, key) for v in value]
    if origin is dict or kind is dict:
        glued = _glued_colon(value)
        space = f"; write `{glued.replace(':', ': ', 1)}` with a space after the colon" if glued else ""
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}{space}")
        if glued:
            raise RecipeError(f"{key}: {value!r} has the key {glued!r} without a value{space}")
        arguments = typing.get_args(kind)
        if len(arguments) == 2 and arguments[1] is str:
            return _read_overrides(value, str)
        # deepspeed.extra: YAML 1.1 reads 5e8 (no dot) as text, which DeepSpeed's integer options refuse.
        return _numbers_read(_read_overrides(value, Any))
    if kind is Any:
        return value
    return _scalar(kind, value, key)


def _glued_colon(value: Any) -> str | None:
    """The `key:value` written without a space where a mapping was meant: YAML reads `prompt:instruction`
    as one text, and `{prompt:instruction}` as the key 'prompt:instruction' without a value."""
    if isinstance(value, str):
        return value if ":" in value and ": " not in value else None
    if isinstance(value, dict):
        return next((str(name) for name, item in value.items() if item is None and ":" in str(name)), None)
    return None


# What YAML 1.1 leaves as text though it is a number: an exponent without a dot or a sign (5e8, 1e-3, 1.5e8).
# Quoted text without an exponent ("2024", "001": a job name) stays text.
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers_read(value: Any) -> Any:
    """`value` with every text written as a number with an exponent (5e8, '1e-3') made that number: an int
    where it is whole and written without a dot."""
    if isinstance(value, dict):
        return {key: _numbers_read(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_read(item) for item in value]
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value else number
    return value


class UnquotedText(RecipeError):
    """A text key given a number, boolean or date by YAML (`revision: 1.10` reads as 1.1)."""

    def __init__(self, key: str, value: Any, source: str | None = None):
        self.key, self.value = key, value
        source = str(value) if source is None else source
        kind = "boolean" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "date"
        super().__init__(f"{key}: expected text, got the {kind} {value!r} (YAML reads an unquoted {source} as a "
                         f"{kind}); quote it: '{source}'")


def _scalar(kind: type, value: Any, key: str) -> Any:
    if value is None:
        raise RecipeError(f"{key}: needs a value, not empty or null")
    if kind is str and isinstance(value, (bool, int, float, datetime.date)):
        raise UnquotedText(key, value)  # stringified, 1.10 would silently become '1.1'
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if isinstance(value, str):
                return value
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise RecipeError(f"{key}: expected {kind.__name__}, got {value!r}")
