"""One conversation with a model, as `launch/chat.py` (trainer/evaluation/chat.py) holds it: the
history written the way training wrote it (the chat template over the whole history, or an
instruction template's prompt per turn with each answer ending in EOS), each answer sampled
(temperature, top-p) or greedy and streamed token by token with a KV cache, and the oldest turns
dropped where the history, with room for an answer, would pass the trained length. ChatOptions holds
the chat.* settings.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from trainer.data.chat_templates import chat_template
from trainer.data.encoding import conversation_tokens, prompt_tokens
from trainer.data.formats import DataError
from trainer.data.tokenizer_checks import document_bos
from trainer.evaluation.generate import cache_argument, stop_ids


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
