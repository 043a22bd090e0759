"""The benchmark job, defined once for both frameworks: a base, data, batch, length and step count,
written as overrides of `recipes/tiny_alpaca.yaml` that `launch/train.py` (ours) and
`launch.benchmarks.hf_trainer` (transformers Trainer + peft) both read.

CPU: the built-in tiny Llama. GPU: a 1B-class Llama (TinyLlama's shape) with random weights and
at least a 32k vocabulary, built once into the cache. Data: GSM8K where `data/gsm8k/prepare.py` finds a local
copy (`../shared/data`), else `builtin:tasks`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from data import prepare_common
from data.gsm8k import prepare as gsm8k_data
from trainer.model import builtin

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_alpaca.yaml"
LLAMA2_TOKENIZER = prepare_common.SHARED / "tokenizers" / "llama2" / "tokenizer.model"
ONE_B_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048}
# The GPU job's output head is at least this wide (Llama 2's vocabulary), whatever tokenizer it has.
MIN_VOCAB = 32000


@dataclass
class Job:
    base: str  # model.name_or_path
    data: str  # data.path
    max_seq_len: int = 512
    global_batch: int = 16
    micro_batch: int = 8
    warmup_steps: int = 3  # run first, left out of the timing
    timed_steps: int = 20
    activation_checkpointing: bool = False
    learning_rate: float = 2e-4
    lora_dropout: float = 0.05  # QLoRA's value for 7B/13B

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def overrides(self) -> list[str]:
        """The recipe overrides both frameworks train with. Nothing is evaluated or saved mid-run."""
        return [
            f"model.name_or_path={self.base}", "model.dtype=auto", "model.attn_implementation=sdpa",
            "quant.bits=4", "quant.quant_type=nf4", "quant.double_quant=true",
            "lora.r=16", "lora.alpha=32", f"lora.dropout={self.lora_dropout}",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            "lora.rslora=false",
            f"data.path={self.data}", f"data.max_seq_len={self.max_seq_len}", "data.eval_fraction=0",
            "data.template=alpaca", "data.train_on_prompt=false",
            f"train.max_steps={self.total_steps}", f"train.global_batch_size={self.global_batch}",
            f"train.micro_batch_size={self.micro_batch}", f"train.learning_rate={self.learning_rate}",
            "train.weight_decay=0", "train.warmup_steps=2", "train.grad_clip=1.0", "train.log_every=1",
            f"train.eval_every={10 ** 6}", f"train.save_every={10 ** 6}",
            f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
            "train.report=false",  # no TensorBoard events or report.png: theirs runs with report_to="none"
        ]


def default_data() -> str:
    """GSM8K where its prepare script finds a local copy, else builtin:tasks: a benchmark never waits on the hub."""
    source = gsm8k_data.default_source()
    return source if Path(source).is_file() else "builtin:tasks"


def ensure_bench_base(gpu: bool) -> str:
    """The built-in tiny Llama on CPU; on GPU a 1B-class Llama built once (random weights, bf16)."""
    if not gpu:
        return str(builtin.ensure_tiny_base())
    final = builtin.cache_dir() / "models" / "bench-llama-1b-v2"
    if (final / builtin.MARKER).exists():
        return str(final)
    staging = final.parent / f".{final.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"building a random-weight 1B Llama into {final} (first use)", flush=True)
    _build_one_b(staging)
    (staging / builtin.MARKER).write_text(json.dumps(ONE_B_SHAPE) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    return str(final)


def _build_one_b(directory: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    if LLAMA2_TOKENIZER.is_file():  # Llama 2's 32k vocabulary: a realistic output head
        shutil.copy(LLAMA2_TOKENIZER, directory / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(directory, legacy=False, add_bos_token=True, add_eos_token=False)
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    else:
        tokenizer = AutoTokenizer.from_pretrained(builtin.ensure_tiny_base())
    tokenizer.save_pretrained(directory)
    # Without Llama 2's tokenizer the tiny base's (1,001 tokens) is used, and the vocabulary padded to
    # 32k: the output projection and loss then cost what a real model's do.
    config = LlamaConfig(vocab_size=max(len(tokenizer), MIN_VOCAB), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **ONE_B_SHAPE)
    torch.manual_seed(builtin.SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def step_tokens(job: Job) -> list[dict[str, int]]:
    """Per optimizer step: `useful` tokens (every non-pad token of its examples) and `trained`
    tokens (response tokens the loss is taken on). Both frameworks see these exact examples."""
    from trainer.config import load_recipe
    from trainer.data.encoding import IGNORE_INDEX
    from trainer.data.batching import BatchPlan
    from trainer.data.pipeline import build_datasets
    from trainer.model.base import load_tokenizer, resolve_base

    recipe = load_recipe(RECIPE, job.overrides())
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    train_set, _, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    plan = BatchPlan(len(train_set), recipe.train.global_batch_size, recipe.train.seed)
    steps = []
    for step in range(job.total_steps):
        examples = [train_set[i] for i in plan.indices(step)]
        steps.append({"useful": sum(len(e.input_ids) for e in examples),
                      "trained": sum(label != IGNORE_INDEX for e in examples for label in e.labels[1:]),
                      "squared": sum(len(e.input_ids) ** 2 for e in examples)})
    return steps


def flops_per_token(base: str, sum_squared_lengths: float, sum_lengths: float) -> float:
    """LoRA on a frozen base: ~2N forward + ~2N backward (input gradients only) per token, plus
    causal attention (QK^T and AV, forward + backward) over each token's own example, for
    examples of the given lengths (sums over the examples of length^2 and of length)."""
    config = json.loads((Path(base) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = hidden // heads
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * config["intermediate_size"]
    n = layers * per_layer + hidden * config["vocab_size"]
    # Causal: a token attends to (its position + 1) keys, s/2 on average over an example of length s.
    attention_context = sum_squared_lengths / sum_lengths / 2
    attention = layers * 3 * 2 * 2 * hidden * attention_context
    return 4 * n + attention


def measured_bf16_matmul_flops(size: int = 8192, repeats: int = 20) -> float:
    """The device's dense bf16 matrix-multiply rate, measured now (FLOP/s): the best of `repeats`
    timed [size x size] products, after a warm-up. MFU is taken against this, not a datasheet
    number: clocks, power limits and the card's variant (SXM, PCIe, NVL) differ from one machine to
    the next."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size ** 3 / best
