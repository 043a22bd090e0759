"""Recipes as typed dataclasses, and what makes one valid (`Recipe.validate`).

Every default lives here, once. The loop reads fields, never `dict.get(key, default)`. A recipe is read
from YAML and overrides by trainer/recipe_loading.py; the DeepSpeed config is derived from it by
trainer/runtime/deepspeed_config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any


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
    mixture: list[DataSource] = field(default_factory=list)  # several datasets (own split/format/columns); replaces path
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


# DeepSpeed keys that deepspeed_config (trainer/runtime/deepspeed_config.py) derives from the recipe, and
# the recipe key each comes from: set in deepspeed.extra they would contradict it (4-bit storage,
# checkpoints and the loop follow the recipe).
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
