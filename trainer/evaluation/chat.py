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
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from trainer import options
from trainer.config import Recipe, RecipeError
from trainer.data.chat_templates import chat_template
from trainer.data.encoding import conversation_tokens, prompt_tokens
from trainer.data.formats import DataError
from trainer.data.tokenizer_checks import document_bos
from trainer.evaluation.generate import cache_argument, stop_ids

COMMANDS = "/reset clears the conversation, /exit leaves, Ctrl-C stops an answer"


@dataclass
class ChatOptions:
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("adapter",)
    adapter: str = ""  # checkpoint dir | merged export dir | .gguf file | none
    temperature: float = 0.7  # sampling temperature (0: greedy)
    top_p: float = 0.9  # nucleus sampling: the smallest set of tokens holding this much probability
    max_new_tokens: int = 256  # per answer
    greedy: bool = False  # always the most likely token (same answer every time)
    seed: int = 0  # sampling seed


# ------------------------------------------------------------------------------ prompts


def conversation_ids(tokenizer, history: list[dict[str, str]], template: str) -> list[int]:
    """The tokens before the next assistant answer. `history` alternates user and assistant
    messages and ends with a user message."""
    if template == "chat":
        try:
            return conversation_tokens(tokenizer, history)
        except DataError:  # a template that re-renders earlier turns (drops their reasoning): the whole text
            text = tokenizer.apply_chat_template(history, chat_template=chat_template(tokenizer)[0],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            bos = document_bos(tokenizer)
            return ([bos] if bos is not None and ids[:1] != [bos] else []) + ids
    ids: list[int] = []
    for index in range(0, len(history), 2):  # an instruction template: one prompt per turn
        ids += prompt_tokens(tokenizer, {"instruction": history[index]["content"], "input": "", "output": ""},
                             template)
        if index + 1 < len(history):
            ids += tokenizer(history[index + 1]["content"], add_special_tokens=False)["input_ids"]
            ids.append(tokenizer.eos_token_id)
    return ids


# ------------------------------------------------------------------------------ decoding


@torch.no_grad()
def stream_tokens(model: nn.Module, prompt: list[int], opts: ChatOptions, eos_ids: set[int],
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """Token ids of one answer, as they are generated (EOS not included), with a KV cache."""
    device = next(model.parameters()).device
    cache = DynamicCache()
    step = torch.tensor([prompt], device=device)
    greedy = opts.greedy or opts.temperature <= 0
    for _ in range(opts.max_new_tokens):
        output = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        logits = output.logits[0, -1].float()
        token = int(logits.argmax()) if greedy else sample(logits, opts.temperature, opts.top_p, generator)
        if token in eos_ids:
            return
        yield token
        step = torch.tensor([[token]], device=device)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature), keeping only the most likely tokens whose
    probabilities add up to `top_p` (always at least one)."""
    probabilities = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probabilities.sort(descending=True)
    outside = ordered.cumsum(0) - ordered >= top_p  # tokens after the nucleus is already full
    ordered[outside] = 0.0
    choice = torch.multinomial(ordered.cpu(), 1, generator=generator).item()
    return int(order[choice])


def stream_text(tokenizer, tokens: Iterator[int], write: Callable[[str], None]) -> str:
    """Decode `tokens` as they come, writing each new piece of text; returns the whole answer.
    A token that ends inside a multi-byte character (byte-level BPE, byte fallback) is held
    until the character is complete."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        write(text[len(shown):])
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    write(text[len(shown):])
    return text


# ------------------------------------------------------------------------------ the session


class Chat:
    def __init__(self, model: nn.Module, tokenizer, template: str, opts: ChatOptions, trained_length: int,
                 note: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)):
        self.model, self.tokenizer, self.template, self.opts = model, tokenizer, template, opts
        self.trained_length, self.note = trained_length, note
        self.history: list[dict[str, str]] = []
        self.generator = torch.Generator().manual_seed(opts.seed)
        self.eos_ids = stop_ids(model, tokenizer)

    def prompt(self) -> list[int]:
        """The tokens before the next answer, the oldest turns dropped (from the history too) while they
        and room for an answer would pass the trained length."""
        room = min(self.opts.max_new_tokens, self.trained_length // 2)
        prompt = conversation_ids(self.tokenizer, self.history, self.template)
        dropped = 0
        while len(prompt) + room > self.trained_length and len(self.history) > 1:
            del self.history[:2]  # the oldest question and its answer
            dropped += 1
            prompt = conversation_ids(self.tokenizer, self.history, self.template)
        if dropped:
            self.note(f"(the conversation passed the trained length, data.max_seq_len={self.trained_length} tokens "
                      f"with room for a {room}-token answer: its {dropped} oldest turn(s) dropped)")
        if len(prompt) + room > self.trained_length:
            self.note(f"(this message is {len(prompt)} tokens as a prompt: longer than the model was trained on, "
                      f"data.max_seq_len={self.trained_length} with room for a {room}-token answer; "
                      f"the answer may suffer)")
        return prompt

    def reply(self, message: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `message` through `write`; both join the history. Ctrl-C while it streams
        (KeyboardInterrupt, passed on to the caller) keeps what was shown as the answer, as the reader saw
        it; where nothing was shown, the question leaves the history too."""
        self.history.append({"role": "user", "content": message})
        shown: list[str] = []

        def show(piece: str) -> None:
            shown.append(piece)
            write(piece)

        try:
            prompt = self.prompt()
            answer = stream_text(self.tokenizer, stream_tokens(self.model, prompt, self.opts, self.eos_ids,
                                                               self.generator), show)
        except KeyboardInterrupt:
            partial = "".join(shown).strip()
            if partial:
                self.history.append({"role": "assistant", "content": partial})
            else:
                self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer

    def reset(self) -> None:
        self.history.clear()


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
