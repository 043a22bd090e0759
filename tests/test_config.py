"""Recipes (trainer/config.py, trainer/recipe_loading.py, trainer/runtime/deepspeed_config.py): every
shipped recipe loads and comments every key, typos and bad values name the key, overrides are coerced,
and the derived DeepSpeed config is what each setting implies."""
from pathlib import Path

import pytest
import yaml

from trainer.config import Recipe, RecipeError
from trainer.recipe_loading import load_recipe
from trainer.runtime.deepspeed_config import deepspeed_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    config = deepspeed_config(recipe, world_size=2, precision="float32")
    assert config["zero_optimization"]["stage"] == recipe.deepspeed.zero_stage


@pytest.mark.parametrize("stage,world,offload,precision,runs", [
    (2, 1, False, "float32", 0), (1, 1, False, "float32", 0), (2, 2, False, "float32", 2),
    (2, 1, True, "float32", 2), (3, 1, False, "float32", 3), (0, 1, False, "float32", 0),
    (2, 1, False, "bfloat16", 2), (1, 1, False, "float16", 1)])  # bf16/fp16 stage 0: see below
def test_zero_1_and_2_on_one_rank_in_fp32_run_as_stage_0(tmp_path, stage, world, offload, precision, runs):
    recipe = load_recipe(write(tmp_path, f"deepspeed: {{zero_stage: {stage}, offload_optimizer: {str(offload).lower()}}}\n"))
    assert deepspeed_config(recipe, world_size=world, precision=precision)["zero_optimization"]["stage"] == runs
    assert recipe.deepspeed.zero_stage == stage  # the recipe (and what checkpoints record) is unchanged


def test_shipped_recipes_cover_the_required_variants():
    loaded = {p.name: load_recipe(p) for p in RECIPES}
    assert {"llama_alpaca.yaml", "tiny_alpaca.yaml"} <= set(loaded)
    assert any(r.quant.bits == 8 for r in loaded.values())
    assert any(r.quant.bits == 4 and r.deepspeed.zero_stage == 3 for r in loaded.values())
    main = loaded["llama_alpaca.yaml"]
    assert (main.quant.bits, main.quant.quant_type, main.quant.double_quant) == (4, "nf4", True)
    assert (main.lora.r, main.lora.alpha, main.lora.dropout) == (16, 32, 0.05)
    assert main.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert main.deepspeed.zero_stage == 2


def test_every_key_in_shipped_recipes_is_commented():
    for path in RECIPES:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("#") and "launch/train.py" in "\n".join(lines[:12]), path
        for number, line in enumerate(lines, start=1):
            if ":" in line and not line.lstrip().startswith("#") and not line.strip().endswith(":"):
                assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_path_and_the_nearest_key(tmp_path):
    path = write(tmp_path, "train:\n  learning_rte: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown key train\.learning_rte; did you mean train\.learning_rate"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"unknown key lorra; did you mean lora"):
        load_recipe(write(tmp_path, "lorra: {r: 4}\n"))


def test_mistyped_value_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.max_steps: expected int, got 'many'"):
        load_recipe(write(tmp_path, "train: {max_steps: many}\n"))
    with pytest.raises(RecipeError, match=r"quant\.bits: must be 4, 8 or 16"):
        load_recipe(write(tmp_path, "quant: {bits: 3}\n"))
    with pytest.raises(RecipeError, match=r"train\.sample_count: must be 0 or more"):
        load_recipe(write(tmp_path, "train: {sample_count: -1}\n"))
    with pytest.raises(RecipeError, match=r"unknown key data\.drop_leak; did you mean data\.drop_leaked"):
        load_recipe(write(tmp_path, "data: {drop_leak: false}\n"))


def test_overrides_are_coerced_to_the_field_type(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    recipe = load_recipe(path, ["train.max_steps=7", "train.learning_rate=1e-3", "quant.double_quant=false",
                                "lora.target_modules=q_proj,v_proj", "output_dir=/tmp/x", "resume=auto",
                                "deepspeed.zero_stage=3", "data.path=some/file.json", "train.keep_last=null",
                                "data.drop_leaked=false", "train.sample_count=0"])
    assert recipe.train.max_steps == 7 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.learning_rate == 1e-3 and isinstance(recipe.train.learning_rate, float)
    assert recipe.quant.double_quant is False
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert (recipe.output_dir, recipe.resume, recipe.deepspeed.zero_stage) == ("/tmp/x", "auto", 3)
    assert recipe.train.keep_last is None
    assert recipe.data.drop_leaked is False and recipe.train.sample_count == 0
    assert Recipe().data.drop_leaked is True  # leaked rows are dropped unless a recipe says otherwise
    with pytest.raises(RecipeError, match="train.max_stepz"):
        load_recipe(path, ["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(path, ["max_steps"])


def test_a_custom_template_with_a_placeholder_nothing_fills_is_refused(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    with pytest.raises(RecipeError, match=r"data.template: has \{output\}, \{question\}: only \{instruction\} and "
                                          r"\{input\} are filled in \(the response is appended"):
        load_recipe(path, ["data.template=### Q: {question} {instruction}\n{input}\n### A: {output}\n"])
    # Braces that are not a {name} (JSON in the instructions) are the template's text.
    recipe = load_recipe(path, ['data.template=Reply as {"answer": 1}. {instruction}'])
    assert recipe.data.template == 'Reply as {"answer": 1}. {instruction}'


def test_a_text_override_is_taken_as_typed(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    recipe = load_recipe(path, ["output_dir=runs/x #2", "model.revision=1.10", "data.template=### Q: {instruction}",
                                "data.path='my file.json'", "lora.target_modules=[q_proj, v_proj]"])
    assert (recipe.output_dir, recipe.model.revision, recipe.data.template, recipe.data.path) == (
        "runs/x #2", "1.10", "### Q: {instruction}", "my file.json")  # no comment, no number, no mapping
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert load_recipe(path, ["model.revision=0123"]).model.revision == "0123"  # not the octal 83
    assert load_recipe(path, ["model.revision=null"]).model.revision is None  # an optional text may be null
    quoted = load_recipe(path, ['data.template="Q: {instruction}\\nA: "', "data.path='it''s.json'"])
    assert (quoted.data.template, quoted.data.path) == ("Q: {instruction}\nA: ", "it's.json")  # as YAML quotes read
    # Keys inside a mapping: read for its value type, and the recipe still saves as YAML (checkpoints do).
    nested = load_recipe(path, ["deepspeed.extra.zero_optimization.reduce_bucket_size=5000",
                                "deepspeed.extra.wall_clock_breakdown=false", "data.columns.question=instruction"])
    assert nested.deepspeed.extra == {"zero_optimization": {"reduce_bucket_size": 5000}, "wall_clock_breakdown": False}
    assert nested.data.columns == {"question": "instruction"} and type(nested.data.columns["question"]) is str
    assert yaml.safe_load(yaml.safe_dump(nested.to_dict()))["deepspeed"]["extra"] == nested.deepspeed.extra
    for empty in ("output_dir=", "output_dir=null", "model.name_or_path=~"):
        with pytest.raises(RecipeError, match=f"{empty.split('=')[0]}: needs a value, not empty or null"):
            load_recipe(path, [empty])  # it used to be the text "None"


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", "train.learning_rate: must be a finite positive number, got -1.0"),
    ("train.learning_rate=.nan", "train.learning_rate: must be a finite positive number, got nan"),
    ("train.min_lr_ratio=-1", r"train.min_lr_ratio: must be in \[0, 1\]"),
    ("train.min_lr_ratio=3", r"train.min_lr_ratio: must be in \[0, 1\]"),
    ("train.warmup_steps=-2", "train.warmup_steps: must be 0 or more"),
    ("train.grad_clip=-1", r"train.grad_clip: must be a finite number, 0 \(no clipping\) or more"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number, 0 or more"),
    ("train.max_consecutive_skips=-1", "train.max_consecutive_skips: must be 0 or more"),
    ("train.eval_every=0", "train.eval_every: must be positive"),
    ("train.log_every=0", "train.log_every: must be positive"),
    ("lora.alpha=0", "lora.alpha: must be a finite positive number"),
    ("data.max_eval_rows=-1", "data.max_eval_rows: must be 0 or more"),
    ("data.max_rows=0", "data.max_rows: must be positive or null"),
    ("quant.quant_storage=int3", "quant.quant_storage: must be auto, uint8"),
])
def test_out_of_range_numbers_name_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "train: {max_steps: 5}\n"), [override])


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=inf", "train.learning_rate: must be a finite positive number, got inf"),
    ("lora.alpha=.inf", r"lora.alpha: must be a finite positive number \(the update is scaled by alpha / r\), got inf"),
    ("lora.plus_ratio=inf", r"lora.plus_ratio: must be a finite positive number \(1 = plain LoRA\), got inf"),
    ("train.grad_clip=inf", r"train.grad_clip: must be a finite number, 0 \(no clipping\) or more, got inf"),
    ("train.weight_decay=.inf", "train.weight_decay: must be a finite number, 0 or more, got inf"),
])
def test_an_infinite_number_is_named_as_not_finite(tmp_path, override, message):
    """inf passes a "must be positive" reading: the message says why it was refused."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "train: {max_steps: 5}\n"), [override])


@pytest.mark.parametrize("text, overrides, glued", [
    ("data: {columns: {prompt:instruction}}\n", [], "prompt:instruction"),
    ("data:\n  columns:\n    prompt:instruction\n", [], "prompt:instruction"),  # block style: one text
    ("train: {max_steps: 5}\n", ["data.columns={prompt:instruction}"], "prompt:instruction"),
    ("train: {max_steps: 5}\n", ["data.mixture=[{path: a.json, columns: {question:instruction}}]"], "question:instruction"),
])
def test_a_column_mapping_without_a_space_after_the_colon_says_so(tmp_path, text, overrides, glued):
    """YAML reads `{prompt:instruction}` as the key 'prompt:instruction' with no value."""
    written = glued.replace(":", ": ")
    with pytest.raises(RecipeError, match=f"columns: .*'{glued}'.*; write `{written}` with a space after the colon"):
        load_recipe(write(tmp_path, text), overrides)
    spaced = load_recipe(write(tmp_path, "train: {max_steps: 5}\n"), [f"data.columns={{{written}}}"])
    assert spaced.data.columns == dict([written.split(": ")])


def test_eight_bit_with_zero3_is_refused_with_a_reason(tmp_path):
    with pytest.raises(RecipeError, match="quant.bits=8 with deepspeed.zero_stage=3"):
        load_recipe(write(tmp_path, "quant: {bits: 8}\ndeepspeed: {zero_stage: 3}\n"))


def test_deepspeed_dict_is_derived_and_extra_passes_through(tmp_path):
    recipe = load_recipe(write(tmp_path, (
        "train: {global_batch_size: 32, micro_batch_size: 4, grad_clip: 0.5}\n"
        "deepspeed: {zero_stage: 3, offload_optimizer: true, extra: {zero_optimization: {reduce_bucket_size: 1000}, "
        "communication_data_type: fp32}}\n")))
    config = deepspeed_config(recipe, world_size=2, precision="bfloat16")
    assert config["train_batch_size"] == 32 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert config["communication_data_type"] == "fp32"
    with pytest.raises(RecipeError, match="not a multiple"):
        deepspeed_config(recipe, world_size=3, precision="float32")
    # What the recipe sets cannot be set again in extra, where it would contradict the recipe.
    for extra, owner in (("{zero_optimization: {stage: 3}}", "deepspeed.zero_stage"),
                         ("{gradient_accumulation_steps: 4}", "train.global_batch_size"),
                         ("{bf16: {enabled: true}}", "model.dtype"), ("{optimizer: {type: Adam}}", "AdamW")):
        with pytest.raises(RecipeError, match=f"deepspeed.extra.*: the recipe sets this through .*{owner}"):
            load_recipe(write(tmp_path, f"deepspeed: {{extra: {extra}}}\n"))


@pytest.mark.parametrize("device, bf16, expected", [("cpu", True, "float32"), ("cuda", True, "bfloat16"),
                                                    ("cuda", False, "float16")])
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch, device, bf16, expected):
    import torch

    from trainer.model.base import compute_dtype, dtype_name

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert dtype_name(compute_dtype(Recipe(), torch.device(device))) == expected
    assert dtype_name(compute_dtype(load_recipe(RECIPES[0].parent / "tiny_alpaca.yaml", ["model.dtype=bfloat16"]),
                                    torch.device(device))) == "bfloat16"


def test_quant_compute_dtype_sets_the_4bit_layers_products_only(tmp_path):
    import torch

    from trainer.model.base import quantization_config

    recipe = load_recipe(RECIPES[0].parent / "tiny_alpaca.yaml", ["quant.bits=4"])
    assert quantization_config(recipe, torch.float32).bnb_4bit_compute_dtype == torch.float32  # auto: the model's
    recipe = load_recipe(RECIPES[0].parent / "tiny_alpaca.yaml", ["quant.bits=4", "quant.compute_dtype=bfloat16"])
    assert quantization_config(recipe, torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    for wrong in ("bf16", "float16"):  # fp16 products would need the loss scaling only an fp16 model gets
        with pytest.raises(RecipeError, match=r"quant\.compute_dtype: must be auto, float32 or bfloat16 \(for fp16"):
            load_recipe(RECIPES[0].parent / "tiny_alpaca.yaml", [f"quant.compute_dtype={wrong}"])
    # Unused at 8 and 16 bits, so eval/export's quant.bits=16 works on a recipe that sets it.
    recipe = load_recipe(RECIPES[0].parent / "tiny_alpaca.yaml", ["quant.bits=16", "quant.compute_dtype=bfloat16"])
    assert quantization_config(recipe, torch.float32) is None


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_zero_0_in_half_precision_is_refused_with_the_reason(tmp_path, precision):
    recipe = load_recipe(write(tmp_path, "deepspeed: {zero_stage: 0}\n"))
    with pytest.raises(RecipeError, match="zero_stage=0 with a .* cannot resume exactly.*zero_stage=1 or 2"):
        deepspeed_config(recipe, world_size=2, precision=precision)
    assert deepspeed_config(recipe, world_size=2, precision="float32")["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("stage, accumulation", [(1, None), (2, "fp32"), (3, "fp32")])
def test_bf16_reduces_adapter_gradients_in_fp32(tmp_path, stage, accumulation):
    recipe = load_recipe(write(tmp_path, f"deepspeed: {{zero_stage: {stage}}}\n"))
    config = deepspeed_config(recipe, world_size=2, precision="bfloat16")
    assert config["communication_data_type"] == "fp32"
    assert config.get("data_types", {}).get("grad_accum_dtype") == accumulation
    fp32 = deepspeed_config(recipe, world_size=2, precision="float32")
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


def recipe_keys(cls=Recipe, prefix="") -> list[str]:
    """Every recipe key as section.key (a mixture entry's keys are data.path's, not listed)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        keys += recipe_keys(kind, f"{prefix}{field.name}.") if dataclasses.is_dataclass(kind) else [prefix + field.name]
    return keys


def test_the_reference_recipe_sets_every_key_at_its_default():
    """`--help` says every key is commented in recipes/*.yaml: llama_alpaca.yaml holds them all, and the
    keys added for that carry their defaults (the recipe trains as it did without them)."""
    raw = yaml.safe_load((RECIPES[0].parent / "llama_alpaca.yaml").read_text())
    written = {f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict) for key in keys} | set(raw)
    assert not [key for key in recipe_keys() if key not in written], "recipes/llama_alpaca.yaml lacks a key"
    reference, default = load_recipe(RECIPES[0].parent / "llama_alpaca.yaml"), Recipe()
    added = ["data.format", "data.columns", "data.mixture", "data.on_too_long", "data.on_bad_row", "data.cache",
             *(f"train.{name}" for name in (
                 "activation_checkpointing", "fused_mlp", "fused_norm", "fused_rotary", "fused_qkv", "blocked_attention",
                 "compiled_kernels", "onednn_matmul", "report", "report_to", "wandb_project", "wandb_run_name",
                 "wandb_mode", "on_nonfinite", "max_consecutive_skips", "collective_timeout_minutes"))]
    for key in added:
        section, name = key.split(".")
        assert getattr(getattr(reference, section), name) == getattr(getattr(default, section), name), key


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", r"train.seed: must be in \[0, 2\*\*32\), got -1"),
    ("train.seed=4294967296", r"train.seed: must be in \[0, 2\*\*32\)"),
    ("train.collective_timeout_minutes=.inf", "train.collective_timeout_minutes: must be positive and at most 10080"),
    ("train.collective_timeout_minutes=20000", "train.collective_timeout_minutes: must be positive and at most 10080"),
    ("train.collective_timeout_minutes=.nan", "train.collective_timeout_minutes: must be positive"),
    ("lora.plus_ratio=.inf", "lora.plus_ratio: must be a finite positive number"),
    ("data.mixture=[{path: a.json, weight: .inf}]", r"data.mixture\[0\]: needs a path and a finite weight > 0"),
    ("train.report_to=[wandb];train.wandb_project=team/qlora", r"train.wandb_project: must be at most 128 characters, none of / \\ # \? % :"),
    ("train.report_to=[wandb];train.wandb_project=" + "p" * 129, "train.wandb_project: must be at most 128 characters"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param: DeepSpeed offloads parameters under ZeRO-3 only"),
    ("deepspeed.zero_stage=0", None),  # with the offload_optimizer=true below
])
def test_seed_infinite_values_wandb_project_and_ignored_offloads_are_refused(tmp_path, override, message):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    if message is None:
        with pytest.raises(RecipeError, match="deepspeed.offload_optimizer: deepspeed.zero_stage=0 has no ZeRO optimizer"):
            load_recipe(path, [override, "deepspeed.offload_optimizer=true"])
        return
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, override.split(";"))


def test_an_override_that_a_mixture_would_leave_unread_is_refused(tmp_path):
    """data.mixture's entries name their own paths: data.path=... given beside a recipe's mixture would be
    silently unread. A mixture given beside a recipe's data.path replaces it. data.split, format and
    columns still apply (to data.eval_path and eval.file)."""
    path = write(tmp_path, "data: {mixture: [{path: a.json, weight: 2}]}\n")
    assert load_recipe(path, []).data.mixture[0].path == "a.json"
    with pytest.raises(RecipeError, match=r"data.path=b.jsonl: not read, as data.mixture is set .*"
                                          r"add \{path: b.jsonl\} to the mixture to train on it too, or set "
                                          r"data.mixture=\[\]"):
        load_recipe(path, ["data.path=b.jsonl"])
    for override in ("data.format=chat", "data.split=test", "data.columns={q: instruction}", "data.columns.q=instruction"):
        assert load_recipe(path, [override, "data.eval_path=qa.jsonl"]).data.mixture  # read for data.eval_path
    assert load_recipe(path, ["data.mixture=[]", "data.path=b.jsonl"]).data.path == "b.jsonl"
    path = write(tmp_path, "data: {path: tatsu-lab/alpaca, format: alpaca}\n")  # as recipes/llama_alpaca.yaml
    recipe = load_recipe(path, ["data.mixture=[{path: a.json}, {path: b.jsonl}]"])
    assert [source.path for source in recipe.data.mixture] == ["a.json", "b.jsonl"]


def test_a_wandb_project_is_checked_only_where_wandb_is_used(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    assert load_recipe(path, ["train.report_to=[tensorboard]", "train.wandb_project=team/qlora"]).train.wandb_project


def test_offloading_is_kept_where_deepspeed_reads_it(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    for stage in (1, 2, 3):  # ZeRO-1/2 on one fp32 rank keep their stage (and the offload) instead of running as 0
        config = deepspeed_config(load_recipe(path, [f"deepspeed.zero_stage={stage}", "deepspeed.offload_optimizer=true"]),
                                  world_size=1, precision="float32")
        assert config["zero_optimization"]["stage"] == stage
        assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    config = deepspeed_config(load_recipe(path, ["deepspeed.zero_stage=3", "deepspeed.offload_param=true"]),
                              world_size=1, precision="float32")
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}


@pytest.mark.parametrize("value, message", [
    ("sdap", r"model.attn_implementation: unknown 'sdap'; did you mean sdpa\?"),
    ("flash_attention", r"unknown 'flash_attention'; did you mean flash_attention_\d\?"),
    ("packed_sdpa", "packed_sdpa is switched on by the trainer itself over sdpa"),
])
def test_an_unknown_attention_implementation_is_named_with_the_nearest(tmp_path, value, message):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [f"model.attn_implementation={value}"])


@pytest.mark.parametrize("value", ["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention",
                                   "paged|eager", "paged|sdpa", "kernels-community/flash-attn", "kernels-community/flash-attn@v1:fa"])
def test_the_attention_implementations_transformers_knows_are_accepted(tmp_path, value):
    assert load_recipe(write(tmp_path, "train: {max_steps: 5}\n"),
                       [f"model.attn_implementation={value}"]).model.attn_implementation == value


@pytest.mark.parametrize("text, message", [
    ("model: {revision: 1.10}\n", r"model.revision: expected text, got the number 1.1 \(YAML reads an unquoted 1.10 "
                                  r"as a number\); quote it: '1.10'"),
    ("model: {revision: 0123}\n", "model.revision: expected text, got the number 83 .*quote it: '0123'"),
    ("model: {revision: yes}\n", "model.revision: expected text, got the boolean True .*quote it: 'yes'"),
    ("data: {path: 2024-01-01}\n", "data.path: expected text, got the date .*quote it: '2024-01-01'"),
    ("output_dir: 12\n", "output_dir: expected text, got the number 12"),
])
def test_a_text_key_written_as_a_number_in_the_file_is_refused(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_a_quoted_text_key_and_a_null_where_allowed_are_kept(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: {revision: '1.10'}\ntrain: {wandb_run_name: null, compiled_kernels: null}\n"))
    assert (recipe.model.revision, recipe.train.wandb_run_name, recipe.train.compiled_kernels) == ("1.10", None, None)
    assert load_recipe(write(tmp_path, "model: {revision: null}\nresume: null\n")).model.revision is None
    with pytest.raises(RecipeError, match="output_dir: needs a value"):
        load_recipe(write(tmp_path, "output_dir: null\n"))


def test_numbers_yaml_reads_as_text_in_deepspeed_extra_are_numbers(tmp_path):
    recipe = load_recipe(write(tmp_path, "deepspeed: {extra: {zero_optimization: {reduce_bucket_size: 5e8}, "
                                         "fp16: {initial_scale_power: '1e1'}, communication_data_type: fp32, "
                                         "tensorboard: {job_name: '2024'}}}\n"),
                         ["deepspeed.extra.zero_optimization.allgather_bucket_size=2e8",
                          "deepspeed.extra.fp16.hysteresis=1e0", "deepspeed.extra.fp16.min_loss_scale=1e-4"])
    extra = recipe.deepspeed.extra
    assert extra["zero_optimization"] == {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 200_000_000}
    assert type(extra["zero_optimization"]["reduce_bucket_size"]) is int
    assert extra["fp16"] == {"initial_scale_power": 10, "hysteresis": 1, "min_loss_scale": 1e-4}
    assert extra["communication_data_type"] == "fp32"  # text that is no number stays text
    assert extra["tensorboard"] == {"job_name": "2024"}  # and so does quoted text without an exponent


@pytest.mark.parametrize("extra, message", [
    ("{zero_optimization: {reduce_bucket_sise: 5}}",
     r"deepspeed.extra.zero_optimization.reduce_bucket_sise: DeepSpeed has no such option; did you mean reduce_bucket_size\?"),
    ("{zero_optimization: {reduce_bucket_size: lots}}",
     r"deepspeed.extra.zero_optimization.reduce_bucket_size: DeepSpeed refused 'lots': Input should be a valid integer"),
    ("{fp16: {loss_scale_windw: 100}}", r"deepspeed.extra.fp16.loss_scale_windw: DeepSpeed has no such option; "
                                        r"did you mean loss_scale_window\?"),
    ("{nebula: {enabled: true}}", "deepspeed.extra: DeepSpeed refused the config: Nebula checkpointing has been removed"),
])
def test_deepspeed_refuses_a_bad_extra_as_one_recipe_error_naming_the_key(tmp_path, extra, message):
    from trainer.runtime.deepspeed_config import check_deepspeed_config

    recipe = load_recipe(write(tmp_path, f"deepspeed: {{extra: {extra}}}\n"))
    with pytest.raises(RecipeError, match=message):
        check_deepspeed_config(deepspeed_config(recipe, world_size=1, precision="float16"), recipe.deepspeed.extra)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_deepspeed_accepts_every_shipped_recipes_config(path):
    from trainer.runtime.deepspeed_config import check_deepspeed_config

    recipe = load_recipe(path)
    for precision in ("float32", "bfloat16"):
        check_deepspeed_config(deepspeed_config(recipe, world_size=1, precision=precision), recipe.deepspeed.extra)


def test_the_8bit_recipe_sets_no_4bit_only_setting():
    """quant_type, double_quant, quant_storage and compute_dtype do nothing at 8 bits: the 8-bit recipe does not
    set them (a reader would expect them to matter)."""
    raw = yaml.safe_load((RECIPES[0].parent / "llama_alpaca_8bit.yaml").read_text())
    assert raw["quant"] == {"bits": 8}
