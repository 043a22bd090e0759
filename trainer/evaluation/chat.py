"""Talk to a trained adapter (or a merged export, or the base alone) in the terminal.

    python launch/chat.py RECIPE adapter=DIR [chat.temperature=0.7] [chat.top_p=0.9]
        [chat.max_new_tokens=256] [chat.greedy=true] [chat.seed=0] [--prompt "..."]

`adapter=` takes a checkpoint (base + adapter, quantised as in training, checked like eval's), a
merged export directory, a .gguf file, or `none` (the base alone). The conversation is written the
way training wrote it: with data.template: chat, or where training rendered chat-format rows (which
take the chat template whatever data.template says), the tokenizer's chat template (or the built-in
one) over the whole history; with an instruction template (alpaca), each turn is that template's
prompt and the answer ends with EOS. Tokens are printed as they are generated. `/reset` clears the
history, `/exit` (or end of input, or Ctrl-C at the prompt) leaves; Ctrl-C while an answer streams stops
that answer (what was shown stays in the history) and returns to the prompt. `--prompt "..."` answers
one message on stdout and exits (Ctrl-C: exit code 130).

The model was trained on examples up to data.max_seq_len tokens: when the history, with room for an
answer (chat.max_new_tokens, at most half that length), would pass it, its oldest turns are dropped,
with a note on stderr.

The conversation itself (its history, prompts, sampling and streaming) lives in
trainer/evaluation/chat_session.py.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

from trainer import options
from trainer.config import Recipe, RecipeError
from trainer.evaluation.chat_session import Chat, ChatOptions

COMMANDS = "/reset clears the conversation, /exit leaves, Ctrl-C stops an answer"


def conversation_template(recipe: Recipe, adapter: str) -> str:
    """How training wrote a conversation: "chat" (the chat template) where it rendered chat rows, which
    take the chat template whatever data.template says (data.format: chat, or rows found to be chat by
    data.format: auto, which the checkpoint's meta.json records, and a merged export's copy of it; not a
    .gguf file); else data.template."""
    from trainer.checkpoint.reading import read_meta, resolve_adapter

    formats = [recipe.data.format, *(source.format for source in recipe.data.mixture)]
    path = resolve_adapter(adapter) if adapter.lower() not in ("", "none") else None  # checkpoints/best too
    meta = read_meta(path) if path is not None and path.is_dir() else None  # a merged export carries it too
    if recipe.data.template == "chat" or "chat" in formats or (meta or {}).get("chat_rendered"):
        return "chat"
    return recipe.data.template


def load_for_chat(recipe: Recipe, adapter: str, device: torch.device) -> tuple[nn.Module, object]:
    from trainer.checkpoint.reading import check_adapter, resolve_adapter
    from trainer.evaluation.adapted_model import load_adapted_model
    from trainer.model.base import compute_dtype, load_tokenizer

    if not adapter:
        raise RecipeError("usage: python launch/chat.py RECIPE adapter=<checkpoint dir | merged export | "
                          "file.gguf | none> [chat.temperature=0.7] [--prompt \"...\"]")
    path = Path(adapter)
    if adapter.lower().endswith(".gguf") and not path.is_file():  # else transformers looks for it on the hub
        raise RecipeError(f"adapter={adapter}: no such .gguf file; give the path of a .gguf file, a checkpoint "
                          f"directory, a merged export directory or none")
    if adapter.lower().endswith(".gguf") or (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        from transformers import AutoModelForCausalLM

        gguf = {"gguf_file": path.name} if adapter.lower().endswith(".gguf") else {}
        directory = str(path.parent if gguf else path)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=compute_dtype(recipe, device), **gguf)
        if gguf:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
        else:
            tokenizer = load_tokenizer(directory, recipe)
        return model.to(device).eval(), tokenizer
    adapter_dir = None if adapter.lower() == "none" else resolve_adapter(path)
    if adapter_dir is not None:
        for warning in check_adapter(recipe, adapter_dir):
            print(f"warning: {warning}", file=sys.stderr)
    model, tokenizer, _ = load_adapted_model(recipe, adapter_dir, device)
    return model, tokenizer


def check_options(opts: ChatOptions) -> None:
    """Refuse, before the model loads, the settings sampling cannot use: only those, each with its rule."""
    rules = [("chat.top_p", opts.top_p, 0 < opts.top_p <= 1, "must be in (0, 1]"),  # NaN fails each test
             ("chat.temperature", opts.temperature, 0 <= opts.temperature < math.inf,
              "must be a finite number, 0 or more"),
             ("chat.max_new_tokens", opts.max_new_tokens, opts.max_new_tokens >= 1, "must be 1 or more")]
    failed = [f"{key} {rule}, got {value}" for key, value, ok, rule in rules if not ok]
    if failed:
        raise RecipeError("; ".join(failed))


def chat(recipe: Recipe, opts: ChatOptions, prompt: str | None = None) -> None:
    check_options(opts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_chat(recipe, opts.adapter, device)
    session = Chat(model, tokenizer, conversation_template(recipe, opts.adapter), opts, recipe.data.max_seq_len)
    if prompt is not None:
        session.reply(prompt, _write)
        print(flush=True)
        return
    mode = "greedy" if opts.greedy or opts.temperature <= 0 else f"temperature {opts.temperature}, top-p {opts.top_p}"
    print(f"chatting with {opts.adapter} ({mode}, up to {opts.max_new_tokens} tokens); {COMMANDS}", flush=True)
    while True:
        try:
            message = input("you> ")
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt: leave as /exit does
            print()
            return
        command = message.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        if not command:
            continue
        _write("assistant> ")
        try:
            session.reply(message, _write)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            _write(" (stopped)")
        print(flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def split_prompt(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--prompt TEXT` or `--prompt=TEXT` taken out of argv (TEXT not blank)."""
    prompt, rest, index = None, [], 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--prompt":
            if index + 1 >= len(argv):
                raise RecipeError("--prompt needs a message: --prompt \"...\"")
            prompt, index = argv[index + 1], index + 2
            continue
        if arg.startswith("--prompt="):
            prompt = arg.removeprefix("--prompt=")
        else:
            rest.append(arg)
        index += 1
    if prompt is not None and not prompt.strip():  # refused before the model loads, not answered
        raise RecipeError('--prompt needs a message, got an empty one: --prompt "..."')
    return prompt, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        prompt, rest = split_prompt(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        options.main(lambda recipe, opts: chat(recipe, opts, prompt), ChatOptions, "chat", rest)
    except KeyboardInterrupt:  # while loading, or during a --prompt answer: no traceback
        print(file=sys.stderr)
        raise SystemExit(130) from None
