"""An unknown recipe key or script option is answered with the key the user meant: other trainers' names
(axolotl, HF Trainer, peft, LLaMA-Factory, torchtune) by our full key, a key in the wrong section by its
section, a typo by the nearest key (trainer/recipe_suggestions.py meant_key, trainer/options.py split_argv)."""
import re

import pytest

from conftest import ROOT
from trainer import cli
from trainer.config import Recipe, RecipeError
from trainer.recipe_loading import load_recipe
from trainer.recipe_suggestions import SYNONYMS
from trainer.evaluation.chat_session import ChatOptions
from trainer.evaluation.eval_command import EvalOptions
from trainer.evaluation.export import ExportOptions
from trainer.options import split_argv


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_every_unknown_key_is_named_at_once(tmp_path):
    path = write(tmp_path, "data:\n  max_seq_length: 512\ntrain:\n  learning_rat: 0.001\nbase_model: x\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path, ["lora.rank=8"])
    assert str(raised.value) == (f"{path}: unknown keys: data.max_seq_length (did you mean data.max_seq_len?); "
                                 f"train.learning_rat (did you mean train.learning_rate?); base_model (did you mean "
                                 f"model.name_or_path?); lora.rank (did you mean lora.r?)")
    # in the entries of data.mixture too, written in the file or given on the command line
    path = write(tmp_path, "data:\n  mixture:\n    - {pth: a.jsonl}\n    - {path: b.jsonl, wieght: 2}\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    for where, overrides in ((path, []), (empty, [
            "data.mixture=[{pth: a.jsonl}, {path: b.jsonl, wieght: 2}]"])):
        with pytest.raises(RecipeError) as raised:
            load_recipe(where, overrides)
        assert str(raised.value) == (f"{where}: unknown keys: data.mixture.pth (did you mean data.mixture.path?); "
                                     f"data.mixture.wieght (did you mean data.mixture.weight?)")


@pytest.mark.parametrize("text, message", [
    ("lora:\n  rank: 16\n", "unknown key lora.rank; did you mean lora.r?"),  # spelled closest to lora.dora
    ("lora:\n  lora_alpha: 16\n", "unknown key lora.lora_alpha; did you mean lora.alpha?"),
    ("lora_r: 16\n", "unknown key lora_r; did you mean lora.r?"),
    ("lora_dropout: 0.1\n", "unknown key lora_dropout; did you mean lora.dropout?"),
    ("target_modules: [q_proj]\n", "unknown key target_modules; did you mean lora.target_modules?"),
    ("base_model: x\n", "unknown key base_model; did you mean model.name_or_path?"),
    ("datasets: [x]\n", "unknown key datasets; one dataset is data.path; several are data.mixture"),
    ("sequence_len: 512\n", "unknown key sequence_len; did you mean data.max_seq_len?"),
    ("train:\n  output_dir: runs/x\n", "unknown key train.output_dir; did you mean output_dir?"),
    ("train:\n  max_seq_len: 512\n", "unknown key train.max_seq_len; did you mean data.max_seq_len?"),
])
def test_a_recipe_file_key_from_another_trainer_names_ours(tmp_path, text, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("override, message", [
    ("lr=1e-4", "unknown key lr; did you mean train.learning_rate?"),  # spelled closest to lora
    ("learning_rate=1e-4", "unknown key learning_rate; did you mean train.learning_rate?"),
    ("train.lr=1e-4", "unknown key train.lr; did you mean train.learning_rate?"),
    ("num_epochs=3", "unknown key num_epochs; this trainer counts optimizer steps: train.max_steps"),
    ("micro_batch_size=4", "unknown key micro_batch_size; did you mean train.micro_batch_size?"),
    ("gradient_accumulation_steps=4", "unknown key gradient_accumulation_steps; accumulation is derived"),
    ("max_seq_length=1024", "unknown key max_seq_length; did you mean data.max_seq_len?"),
    ("cutoff_len=1024", "unknown key cutoff_len; did you mean data.max_seq_len?"),
    ("dataset=alpaca.json", "unknown key dataset; did you mean data.path?"),
    ("data.output_dir=runs/x", "unknown key data.output_dir; did you mean output_dir?"),
    ("lora.learning_rte=1e-4", "unknown key lora.learning_rte; did you mean train.learning_rate?"),
    # axolotl's datasets: [{path: ..., type: alpaca}] (spelled closest to model.dtype)
    ("data.mixture=[{path: a.json, type: alpaca}]",
     "unknown key data.mixture.type; did you mean data.mixture.format? (auto, alpaca, instances or chat)"),
    ("data.type=alpaca", "unknown key data.type; did you mean data.format?"),
])
def test_an_override_from_another_trainer_names_ours(tmp_path, override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        cli.parse([str(write(tmp_path, "train: {max_steps: 5}\n")), override])


@pytest.mark.parametrize("override, message", [
    ("lorra.r=4", "unknown key lorra; did you mean lora?"),
    ("train.learning_rte=1", "unknown key train.learning_rte; did you mean train.learning_rate?"),
    # Loosely alike across sections is no suggestion: temperature is not data.template.
    ("temperature=1", "unknown key temperature; valid keys: model, quant, lora, data, train, deepspeed"),
])
def test_typos_keep_their_nearest_key_and_unrelated_keys_list_the_valid_ones(tmp_path, override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write(tmp_path, "train: {max_steps: 5}\n"), [override])


def test_every_synonym_names_keys_that_exist_and_hides_none_of_ours():
    raw = Recipe().to_dict()
    keys = {f"{section}.{key}" for section, value in raw.items() if isinstance(value, dict) for key in value}
    keys |= {section for section, value in raw.items() if not isinstance(value, dict)}
    leaves = {key.rsplit(".", 1)[-1] for key in keys}
    for name, meant in SYNONYMS.items():
        named = re.findall(r"\b[a-z_]+\.[a-z_]+\b|\b(?:output_dir|resume)\b", meant)
        assert named and set(named) <= keys, (name, meant)
        assert name == name.lower() and name not in leaves, name  # ours are found as themselves


@pytest.mark.parametrize("options_class, section, arg, meant", [
    (ChatOptions, "chat", "temperature=0.5", "chat.temperature="),
    (ChatOptions, "chat", "seed=1", "chat.seed="),
    (EvalOptions, "eval", "batch_size=4", "eval.batch_size="),
    (ExportOptions, "export", "dtype=bfloat16", "export.dtype="),
    (EvalOptions, "eval", "adpter=a", "adapter="),
])
def test_a_script_option_without_its_section_is_named_with_it(options_class, section, arg, meant):
    with pytest.raises(RecipeError, match=re.escape(f"unknown option {arg.split('=')[0]}=; did you mean {meant}?")):
        split_argv(["r.yaml", arg], options_class, section)


def test_another_trainers_name_given_to_a_script_is_left_for_the_recipe_to_name():
    for arg in ("lr=1e-4", "num_epochs=3", "lora_r=8"):
        assert split_argv(["r.yaml", arg], EvalOptions, "eval") == ({}, ["r.yaml", arg])


def test_a_recipe_key_given_to_a_script_without_its_section_is_named_by_the_recipe_loader():
    from trainer.evaluation.eval_command import EvalOptions
    from trainer.options import split_argv

    ours, rest = split_argv(["r.yaml", "max_seq_len=1024", "micro_batch_size=4"], EvalOptions, "eval")
    assert ours == {} and rest == ["r.yaml", "max_seq_len=1024", "micro_batch_size=4"]  # not eval.max_new_tokens=
    with pytest.raises(RecipeError, match=r"unknown key max_seq_len; did you mean data\.max_seq_len\?"):
        load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["max_seq_len=1024"])


def test_case_and_a_section_written_inside_another_are_answered():
    with pytest.raises(RecipeError, match=r"unknown key train\.MAX_STEPS; did you mean train\.max_steps\?"):
        load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["train.MAX_STEPS=3"])
    with pytest.raises(RecipeError, match=r"unknown key train\.lora; lora is a section of its own"):
        load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["train.lora=3"])
    with pytest.raises(RecipeError, match=r"unknown key train\.output_dir; did you mean output_dir\?"):
        load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", ["train.output_dir=x"])
