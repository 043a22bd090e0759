"""The benchmark job, defined once for both frameworks: a base, data, batch, length and step count,
written as overrides of `recipes/tiny_alpaca.yaml` that `launch/train.py` (ours) and
`launch.benchmarks.hf_trainer` (transformers Trainer + peft) both read.

CPU: the built-in tiny Llama. GPU: a 1B-class Llama (TinyLlama's shape) with random weights and
at least a 32k vocabulary, built once into the cache. Data: GSM8K where `data/gsm8k/prepare.py` finds a local
copy (`../shared/data`), else `builtin:tasks`.
Also here: the useful FLOPs of a step (`useful_flops`, the formula the bench's utilisation is taken
with); the matrix-multiply peak it is measured against is in `launch/benchmarks/peak.py`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from data import prepare_common
from data.gsm8k import prepare as gsm8k_data
from trainer.data.tasks import SEED
from trainer.model import tiny_base
from trainer.runtime.cache import cache_dir

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
    # Held out from training and scored by both frameworks after the last step (the bench's quality
    # column): a seeded 5% of the rows, of which this many are scored.
    eval_rows: int = 64
    # quant.compute_dtype for both: auto (the model's, fp32 on CPU), or bfloat16 (the frozen 4-bit
    # layers' products in bf16: AMX on a CPU that has it)
    quant_compute_dtype: str = "auto"

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def overrides(self) -> list[str]:
        """The recipe overrides both frameworks train with. Nothing is evaluated or saved mid-run; the
        held-out rows are scored once, after the last step."""
        return [
            f"model.name_or_path={self.base}", "model.dtype=auto", "model.attn_implementation=sdpa",
            "quant.bits=4", "quant.quant_type=nf4", "quant.double_quant=true",
            f"quant.compute_dtype={self.quant_compute_dtype}",
            "lora.r=16", "lora.alpha=32", f"lora.dropout={self.lora_dropout}",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            "lora.rslora=false",
            f"data.path={self.data}", f"data.max_seq_len={self.max_seq_len}",
            f"data.eval_fraction={0.05 if self.eval_rows else 0}", f"data.max_eval_rows={max(self.eval_rows, 1)}",
            "data.template=alpaca", "data.train_on_prompt=false",
            f"train.max_steps={self.total_steps}", f"train.global_batch_size={self.global_batch}",
            f"train.micro_batch_size={self.micro_batch}", f"train.learning_rate={self.learning_rate}",
            "train.weight_decay=0", "train.warmup_steps=2", "train.grad_clip=1.0", "train.log_every=1",
            f"train.eval_every={10 ** 6}", f"train.save_every={10 ** 6}",
            f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
            "train.sample_count=0",  # no greedy answers decoded at the last step: theirs decodes none
            "train.report=false",  # no TensorBoard events or report.png: theirs runs with report_to="none"
        ]


def default_data() -> str:
    """GSM8K where its prepare script finds a local copy, else builtin:tasks: a benchmark never waits on the hub."""
    source = gsm8k_data.default_source()
    return source if Path(source).is_file() else "builtin:tasks"


def ensure_bench_base(gpu: bool) -> str:
    """The built-in tiny Llama on CPU; on GPU a 1B-class Llama built once (random weights, bf16)."""
    if not gpu:
        return str(tiny_base.ensure_tiny_base())
    final = cache_dir() / "models" / "bench-llama-1b-v2"
    if (final / tiny_base.MARKER).exists():
        return str(final)
    staging = final.parent / f".{final.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"building a random-weight 1B Llama into {final} (first use)", flush=True)
    _build_one_b(staging)
    (staging / tiny_base.MARKER).write_text(json.dumps(ONE_B_SHAPE) + "\n")
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
        tokenizer = AutoTokenizer.from_pretrained(tiny_base.ensure_tiny_base())
    tokenizer.save_pretrained(directory)
    # Without Llama 2's tokenizer the tiny base's (1,001 tokens) is used, and the vocabulary padded to
    # 32k: the output projection and loss then cost what a real model's do.
    config = LlamaConfig(vocab_size=max(len(tokenizer), MIN_VOCAB), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **ONE_B_SHAPE)
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def step_tokens(job: Job) -> list[dict[str, int]]:
    """Per optimizer step: `useful` tokens (every non-pad token of its examples), `trained` tokens
    (positions whose next token the loss is taken on), `squared` (the sum of the examples' squared
    lengths) and `trained_pairs` (causal (query, key) pairs with a trained query: position i has
    i + 1 keys). Both frameworks see these exact examples."""
    from trainer.recipe_loading import load_recipe
    from trainer.data.examples import IGNORE_INDEX
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
        trained = [i for e in examples for i, label in enumerate(e.labels[1:]) if label != IGNORE_INDEX]
        steps.append({"useful": sum(len(e.input_ids) for e in examples), "trained": len(trained),
                      "squared": sum(len(e.input_ids) ** 2 for e in examples),
                      "trained_pairs": sum(i + 1 for i in trained)})
    return steps


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(input, output) widths of a Llama-family decoder layer's linear layers, from its config."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


FROZEN = "frozen linears"  # the part of `useful_flops` that quant.compute_dtype moves to another dtype


def useful_flops(config: dict, lora_r: int, lora_targets: list[str], tokens: int, trained: int,
                 sum_squared_lengths: int, trained_pairs: int) -> dict[str, float]:
    """The matrix-multiply FLOPs a QLoRA training step must do (a multiply-add counts 2), by part,
    for examples of `tokens` non-pad tokens in all, `trained` of them predicting a trained label,
    `sum_squared_lengths` = sum over the examples of length^2, and `trained_pairs` the causal
    (query, key) pairs whose query is at a trained position. Per layer and token:

    - frozen linears: 4 x P, P the weights of q, k, v, o, gate, up, down (forward 2P; the backward
      takes the input's gradient, 2P, and no weight gradient: the base is frozen);
    - LoRA: 6 x r x (in + out) per adapted layer (forward through A and B, then each one's weight
      gradient and input gradient);
    - attention: causal, within each example: a token at position i attends to i + 1 keys, so an
      example of length s has s(s + 1)/2 (query, key) pairs, each costing 2 x heads x head_dim for
      the scores and as much for the weighted values, forward; the backward is twice that (two
      products per forward product): 12 x heads x head_dim per pair;
    and once per trained token, the output layer: 4 x vocab x hidden (forward and input gradient;
    the head is frozen). Only what the loss needs is counted, so two layers count less: the last
    one matters only at trained positions, except for its keys and values, which later queries
    read (its q, o and MLP, their adapters and its attention's query rows at trained positions
    only); and the first layer's q, k and v need no input gradient, nothing before them being
    trained (the embedding is frozen). Not counted either: softmax, norms, activations, the
    embedding lookup (no multiplies worth counting), padding, logits at untrained positions. Both
    frameworks are scored by the same count, so it is their step times that differ."""
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    shapes = _linear_shapes(config)
    unknown = sorted(set(lora_targets) - set(shapes))
    if unknown:
        raise ValueError(f"no FLOP count for LoRA targets {unknown} (known: {', '.join(shapes)})")
    pairs = (sum_squared_lengths + tokens) / 2
    frozen = adapters = attention = 0
    for layer in range(layers):
        last = layer == layers - 1
        for name, (fan_in, fan_out) in shapes.items():
            rows = trained if last and name not in ("k_proj", "v_proj") else tokens
            input_grad = not (layer == 0 and name in ("q_proj", "k_proj", "v_proj"))
            frozen += (2 + 2 * input_grad) * fan_in * fan_out * rows
            if name in lora_targets:  # A's input gradient, 2 x r x in, only where the input needs one
                adapters += lora_r * (6 * (fan_in + fan_out) - 2 * (not input_grad) * fan_in) * rows
        attention += 12 * heads * head_dim * (trained_pairs if last else pairs)
    return {FROZEN: frozen, "LoRA": adapters, "attention": attention,
            "output layer": 4 * config["vocab_size"] * config["hidden_size"] * trained}


def base_config(recipe) -> dict:
    """The config.json of the recipe's base (a built-in or a .gguf file resolved to its directory)."""
    from trainer.model.base import resolve_base

    return json.loads((Path(resolve_base(recipe)) / "config.json").read_text())


def step_flops(job: Job, timed: list[dict]) -> list[dict[str, float]]:
    """The useful FLOPs of each timed step, by part."""
    from trainer.recipe_loading import load_recipe

    recipe = load_recipe(RECIPE, job.overrides())
    config = base_config(recipe)
    return [useful_flops(config, recipe.lora.r, recipe.lora.target_modules, t["useful"], t["trained"], t["squared"],
                         t["trained_pairs"]) for t in timed]
