"""GGUF export, checked through a reader we did not write: transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`) reads the file back, and its logits and tokenizer are
compared with the merged model's.

Two comparisons per file type:
- exact: against the merged model with each matrix rounded the way the file stores it (f16, or
  gguf's own q8_0 quantise + dequantise; norms stay float32). Any mistake in names, the rotary row
  order, shapes, tying or metadata shows here as a large difference; float summation order is all
  that is left (1e-4).
- against the float32 merged model: f16 keeps ~11 significant bits, so logits move by ~1e-3 of
  their spread: root-mean-square difference <= 0.5% of the logits' standard deviation, maximum
  <= 5% (measured: tiny base 0.07% and 0.35%, SmolLM2 0.18% and 0.9%). q8_0 stores each block
  of 32 weights as int8 times one f16 scale (absmax / 127), an error of at most half a step,
  ~0.4% of the block's largest weight, ~0.1% on average (uniform rounding: step / sqrt(12)); through 4-30 layers that moves the logits by a few percent of their
  spread. Bounds: root-mean-square difference <= 5% of the logits' standard deviation, and the
  greedy (top-1) token agrees at >= 90% of positions (measured: tiny base 1.7% and 97%, SmolLM2
  2.8% and 98%). The maximum over ~10^6 logits is reported, not bounded: it is an extreme value.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from _checkpoints import make_checkpoint, one_thread, tiny_recipe
from trainer.recipe_loading import load_recipe
from trainer.evaluation.export import ExportOptions, export, instruction_chat_template, load_merged
from trainer.evaluation.gguf_export import output_format, write_gguf
from trainer.evaluation.gguf_mapping import GGUFExportError, byte_level_pre, gguf_tensor_name, tokenizer_metadata
from trainer.model.base import load_tokenizer, resolve_base

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "Below is an instruction that describes a task.\n\n### Response:\n19",
    "Hello, world!  Two  spaces, a tab\tand 1234567 digits.",
    "Accents: café, naïve, Ærøskøbing, señor, Straße, Ελληνικά, русский.",
    "CJK: 日本語のテキスト, 中文句子, 한국어 문장.",
    "Emoji: 🙂🚀👍🏽 and a family 👨‍👩‍👧.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<s> [INST] markup [/INST] </s>",
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def rounded_like_file(model: torch.nn.Module, file_type: str) -> torch.nn.Module:
    import gguf

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if parameter.dim() != 2:
                continue  # norms are written in float32
            weight = parameter.detach().float().numpy()
            if file_type == "q8_0" and weight.shape[-1] % 32 == 0:
                q8 = gguf.GGMLQuantizationType.Q8_0
                weight = gguf.quants.dequantize(gguf.quants.quantize(weight, q8), q8).reshape(weight.shape)
            else:
                weight = weight.astype(np.float16).astype(np.float32)
            parameter.copy_(torch.from_numpy(weight))
    return rounded


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def check_file(path: Path, merged: torch.nn.Module, tokenizer, file_type: str,
               chat_template: str | None = None) -> dict[str, float]:
    """`chat_template`: the one the file should carry, where not the tokenizer's (an export writes the
    template of the prompts the adapter was trained on)."""
    back, back_tokenizer = read_back(path)
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert back_tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == \
            tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert back_tokenizer.chat_template == (chat_template or tokenizer.chat_template)
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(back_tokenizer, name) == getattr(tokenizer, name), name
    assert back.config.vocab_size == merged.config.vocab_size
    assert back.config.tie_word_embeddings == merged.config.tie_word_embeddings

    ids = tokenizer(TEXTS[0] + " " + TEXTS[2] + " " + TEXTS[3])["input_ids"]
    got, exact, full = logits(back, ids), logits(rounded_like_file(merged, file_type), ids), logits(merged, ids)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-4)
    difference = (got - full).abs().max().item()
    rms = (got - full).pow(2).mean().sqrt().item()
    agreement = (got.argmax(-1) == full.argmax(-1)).float().mean().item()
    if file_type == "f16":
        assert rms <= 5e-3 * full.std().item() and difference <= 0.05 * full.std().item()
    else:
        assert rms <= 0.05 * full.std().item()
        assert agreement >= 0.9
    return {"max_abs_difference": difference, "rms_difference": rms, "logit_std": full.std().item(),
            "top1_agreement": agreement}


def test_tiny_base_adapter_exports_to_f16_and_q8_0_gguf_that_transformers_reads_back(tmp_path, tiny_base):
    adapter = make_checkpoint(tmp_path / "run")
    recipe = tiny_recipe()
    merged = load_merged(recipe, adapter)
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    for file_type in ("f16", "q8_0"):
        out = tmp_path / "gguf" / f"tiny-{file_type}.gguf"
        export(recipe, ExportOptions(adapter=str(adapter), out=str(out), format=file_type))
        # The base has no chat template: the file's renders the alpaca prompt the adapter was trained on.
        numbers = check_file(out, merged, tokenizer, file_type, instruction_chat_template("alpaca"))
        print(file_type, numbers)


def test_grouped_query_attention_rows_are_ordered_for_llama_cpp(tmp_path, small_base_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(small_base_path, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    tokenizer = AutoTokenizer.from_pretrained(small_base_path)
    path = write_gguf(model, tokenizer, tmp_path / "gqa.gguf", "f16")
    check_file(path, model, tokenizer, "f16")


def test_format_names_and_refusals():
    assert output_format("out/merged", "auto") == "hf"
    assert output_format("model.gguf", "auto") == "f16"
    assert output_format("model.GGUF", "q8_0") == "q8_0"
    for out, given in (("model.gguf", "hf"), ("merged_dir", "q8_0"), ("model.gguf", "q4_k")):
        with pytest.raises(GGUFExportError):
            output_format(out, given)
    assert gguf_tensor_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(GGUFExportError, match="no llama.cpp name"):
        gguf_tensor_name("model.layers.0.mlp.experts.0.weight")


@pytest.mark.slow
def test_real_gguf_base_round_trips_gguf_fine_tune_gguf(tmp_path, smollm2_base):
    """SmolLM2-135M (read from a GGUF file): byte-level BPE, tied embeddings, 9 query heads on 3
    key/value heads, ChatML. Reading a GGUF back through transformers takes ~1 minute here."""
    overrides = ["model.name_or_path=builtin:smollm2-135m", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
    adapter = make_checkpoint(tmp_path / "run", *overrides, b_std=0.02)
    recipe = load_recipe(ROOT / "recipes" / "tiny_alpaca.yaml", overrides)
    merged = load_merged(recipe, adapter)
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)
    for file_type in ("f16", "q8_0"):
        out = tmp_path / f"smollm2-{file_type}.gguf"
        export(recipe, ExportOptions(adapter=str(adapter), out=str(out), format=file_type))
        from gguf import GGUFReader

        fields = GGUFReader(out).fields
        assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # kept from the original file
        assert "output.weight" not in {tensor.name for tensor in GGUFReader(out).tensors}  # tied
        print(file_type, check_file(out, merged, tokenizer, file_type))


def test_byte_level_pre_tokenizers_get_llama_cpps_name_or_are_refused(smollm2_tokenizer):
    """tokenizer.ggml.pre for a byte-level base that did not come from a GGUF file: named from the
    pre-tokenizer itself (llama.cpp splits text by that name), never guessed."""
    import json

    from tokenizers import Regex, pre_tokenizers

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # as Llama 3's tokenizer.json writes it

    def spec(*steps) -> dict:  # as tokenizers serialises it into tokenizer.json
        pre = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(list(steps))
        return json.loads(json.dumps(json.loads(pre.__getstate__())))

    byte_level, plain_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False)
    assert byte_level_pre(spec(byte_level)) == "gpt-2"
    assert byte_level_pre(spec(pre_tokenizers.Digits(individual_digits=True), byte_level)) == "smollm"
    assert byte_level_pre(spec(pre_tokenizers.Split(Regex(llama3), "isolated"), plain_bytes)) == "llama-bpe"
    assert byte_level_pre(spec(pre_tokenizers.Split(Regex(llama3.replace(r"\p{N}{1,3}", r"\p{N}")), "isolated"),
                               plain_bytes)) == "qwen2"
    for unknown in (spec(pre_tokenizers.Digits(individual_digits=False), byte_level),
                    spec(pre_tokenizers.Split(Regex(r"\d+|\D+"), "isolated"), plain_bytes),
                    spec(pre_tokenizers.Punctuation(), byte_level),
                    spec(pre_tokenizers.ByteLevel(add_prefix_space=True))):  # llama.cpp's gpt-2 adds no space
        with pytest.raises(GGUFExportError, match="none of those this export can name for llama.cpp"):
            byte_level_pre(unknown)
    # The real base's own tokenizer (as transformers converted it from the GGUF file) and the one
    # SmolLM2 ships on the hub (digits apart): GPT-2's and SmolLM's split.
    assert tokenizer_metadata(smollm2_tokenizer, 49152)["tokenizer_pre"] == "gpt-2"
    hub_style = copy.deepcopy(smollm2_tokenizer)
    hub_style.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    assert tokenizer_metadata(hub_style, 49152)["tokenizer_pre"] == "smollm"


def test_add_bos_token_is_what_training_puts_before_every_prompt(tmp_path, tiny_base, smollm2_tokenizer):
    # The converted Llama-2 tokenizer adds no BOS by itself, yet training and eval start every
    # example with one: llama.cpp must add it too. SmolLM2's BOS is a chat turn marker: none added.
    from conftest import shared_llama2
    from transformers import AutoTokenizer

    from trainer.data.tokenizer_checks import document_bos
    from trainer.evaluation.gguf_mapping import tokenizer_metadata

    assert tokenizer_metadata(smollm2_tokenizer, len(smollm2_tokenizer))["add_bos_token"] is False
    tiny = load_tokenizer(str(tiny_base), tiny_recipe())
    assert tokenizer_metadata(tiny, len(tiny))["add_bos_token"] is True
    llama2 = AutoTokenizer.from_pretrained(shared_llama2(tmp_path / "llama2"))
    assert llama2("a", add_special_tokens=True)["input_ids"][:1] != [llama2.bos_token_id]  # adds none itself
    assert document_bos(llama2) == llama2.bos_token_id
    assert tokenizer_metadata(llama2, len(llama2))["add_bos_token"] is True


def test_a_metaspace_inside_a_sequence_still_puts_a_space_before_the_text(tmp_path):
    """The Llama-2 tokenizer converted from its tokenizer.model nests its Metaspace in a Sequence
    pre-tokenizer: tokenizer.ggml.add_space_prefix must still say true, or llama.cpp tokenises
    "Below" as "Bel" "ow" where training saw "▁Below"."""
    import json

    from gguf import GGUFReader
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import shared_llama2

    llama2 = AutoTokenizer.from_pretrained(shared_llama2(tmp_path / "llama2"))
    pre = json.loads(llama2.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre["type"] == "Sequence" and [step["type"] for step in pre["pretokenizers"]] == ["Metaspace"]
    config = LlamaConfig(vocab_size=len(llama2), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    path = write_gguf(LlamaForCausalLM(config).eval(), llama2, tmp_path / "llama2.gguf", "f32")
    written = bool(GGUFReader(path).fields["tokenizer.ggml.add_space_prefix"].contents())
    assert written is True
    # What llama.cpp does with the flag, as a Metaspace that prepends "▁" or not: only true reproduces
    # the tokens training saw.
    as_llama_cpp = copy.deepcopy(llama2)
    as_llama_cpp.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        prepend_scheme="always" if written else "never", split=False)
    for text in TEXTS[:4]:
        assert as_llama_cpp(text, add_special_tokens=False)["input_ids"] == \
            llama2(text, add_special_tokens=False)["input_ids"], text


def test_a_write_that_fails_leaves_no_partial_file(tmp_path, tiny_base, monkeypatch):
    import gguf

    recipe = tiny_recipe()
    merged = load_merged(recipe, make_checkpoint(tmp_path / "run"))
    tokenizer = load_tokenizer(resolve_base(recipe), recipe)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    out = tmp_path / "gguf" / "tiny.gguf"
    with pytest.raises(OSError, match="No space left"):
        write_gguf(merged, tokenizer, out, "f16")
    assert list(out.parent.iterdir()) == []  # neither the file nor its .partial


def test_an_architecture_gguf_cannot_hold_is_refused_before_the_base_is_loaded(tmp_path, monkeypatch):
    from transformers import MistralConfig

    import trainer.evaluation.export as export_module

    base = tmp_path / "mistral"
    MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2).save_pretrained(base)
    monkeypatch.setattr(export_module, "load_merged", lambda *a, **k: pytest.fail("the base was loaded"))
    recipe = tiny_recipe(f"model.name_or_path={base}")
    with pytest.raises(GGUFExportError, match="model_type 'mistral' \\(only llama is mapped\\)"):
        export(recipe, ExportOptions(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "model.gguf")))


def test_a_base_whose_config_cannot_be_read_is_one_clear_error_before_loading(tmp_path):
    from trainer.model.base import ModelLoadError

    missing = tmp_path / "no-such-base"
    with pytest.raises(ModelLoadError, match="no-such-base"):
        export(tiny_recipe(f"model.name_or_path={missing}"),
               ExportOptions(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "model.gguf")))
