"""The DeepSpeed config, derived from a recipe once (`deepspeed_config`), and DeepSpeed's own check of it
(`check_deepspeed_config`), turned into one line that names the recipe key."""
from __future__ import annotations

import copy
import difflib
from typing import Any

from trainer.config import Recipe, RecipeError


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
