"""The pad token a base without one gets: Llama 3 has no pad and no unk, but keeps special tokens spare."""
from __future__ import annotations

import pytest

from trainer.recipe_loading import recipe_from_dict
from trainer.model.base import ModelLoadError, check_embedding_rows, load_tokenizer

CHAT = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"


def llama3_like(directory, specials: list[str], chat_template: str | None = CHAT) -> str:
    """A byte-level BPE tokenizer saved as Llama 3's is: BOS/EOS special, no pad, no unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(range(97, 123))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("specials, pad", [
    (["<|reserved_special_token_0|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>",
      "<|eot_id|>"], "<|finetune_right_pad_id|>"),  # Llama 3.1: one named for padding
    (["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
      "<|eot_id|>"], "<|reserved_special_token_0|>"),  # Llama 3: the first reserved one
])
def test_a_base_without_pad_or_unk_pads_with_a_spare_special_token(tmp_path, specials, pad):
    directory = llama3_like(tmp_path / "tok", specials)
    recipe = recipe_from_dict({"model": {"name_or_path": directory}})
    tokenizer = load_tokenizer(directory, recipe)
    assert tokenizer.pad_token == pad and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 26 + 2 + len(specials)  # no token added: the embedding has a row for it


def test_with_nothing_spare_a_new_pad_is_added(tmp_path):
    # The chat template's own markers are never taken: they are not spare.
    directory = llama3_like(tmp_path / "tok", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tokenizer = load_tokenizer(directory, recipe_from_dict({"model": {"name_or_path": directory}}))
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == 26 + 2 + 3 + 1


def test_a_token_one_of_several_named_chat_templates_writes_is_not_spare(tmp_path):
    # Hermes-style: the default and a tool_use template, loaded as a dict; the reserved token is the
    # tool template's marker, so nothing is spare.
    directory = llama3_like(tmp_path / "tok", ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_0|>",
                                               "<|eot_id|>"], chat_template=None)
    tokenizer = load_tokenizer(directory, recipe_from_dict({"model": {"name_or_path": directory}}))
    tokenizer.chat_template = {"default": CHAT, "tool_use": CHAT + "<|reserved_special_token_0|>"}
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    reloaded = load_tokenizer(directory, recipe_from_dict({"model": {"name_or_path": directory}}))
    assert isinstance(reloaded.chat_template, dict)
    assert reloaded.pad_token == "<pad>"


def test_a_new_pad_without_an_embedding_row_stops_the_run_with_what_to_do(tmp_path):
    directory = llama3_like(tmp_path / "tok", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tokenizer = load_tokenizer(directory, recipe_from_dict({"model": {"name_or_path": directory}}))
    rows = len(tokenizer) - 1  # the base has rows for its own vocabulary, not the new <pad>
    with pytest.raises(ModelLoadError, match=r"the new one \('<pad>'\) has no embedding row.*tokenizer_config.json"):
        check_embedding_rows(tokenizer, rows)
    check_embedding_rows(tokenizer, rows + 1)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    # The pad (id 28) has a row, two later tokens have none: a cut embedding, or another base's tokenizer.
    directory = llama3_like(tmp_path / "tok", ["<|finetune_right_pad_id|>", "<|start_header_id|>", "<|eot_id|>"])
    tokenizer = load_tokenizer(directory, recipe_from_dict({"model": {"name_or_path": directory}}))
    assert tokenizer.pad_token_id == 28
    with pytest.raises(ModelLoadError, match="31 tokens but the model's embedding only 29: the tokenizer is not the base's"):
        check_embedding_rows(tokenizer, 29)
