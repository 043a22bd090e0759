"""launch/chat.py: prompts written as training wrote them, greedy answers equal to evaluation's
decoding, streamed text, sampling knobs, and a real terminal session (a pseudo-terminal)."""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from _checkpoints import ONE_THREAD, make_checkpoint, one_thread, tiny_recipe
from conftest import ROOT, run_cli
from trainer.evaluation.adapted_model import load_adapted_model
from trainer.evaluation.chat import split_prompt
from trainer.evaluation.chat_session import Chat, ChatOptions, conversation_ids, sample, stream_text
from trainer.data.encoding import prompt_tokens
from trainer.evaluation.generate import greedy_batch
from trainer.model.base import load_tokenizer, resolve_base

QUESTION = "Add the two numbers. 7 + 12"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "run", b_std=0.2)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    recipe = tiny_recipe()
    return load_tokenizer(resolve_base(recipe), recipe)


def test_first_turn_prompt_is_evaluations_and_later_turns_carry_the_history(tokenizer):
    user = {"role": "user", "content": QUESTION}
    assert conversation_ids(tokenizer, [user], "alpaca") == prompt_tokens(
        tokenizer, {"instruction": QUESTION, "input": "", "output": ""}, "alpaca")
    assert conversation_ids(tokenizer, [user], "chat") == prompt_tokens(
        tokenizer, {"messages": [user, {"role": "assistant", "content": "19"}]}, "chat")
    for template in ("alpaca", "chat"):
        first = conversation_ids(tokenizer, [user], template)
        history = [user, {"role": "assistant", "content": "19"}, {"role": "user", "content": "And 1 + 1?"}]
        second = conversation_ids(tokenizer, history, template)
        assert second[:len(first)] == first
        decoded = tokenizer.decode(second, skip_special_tokens=True)
        assert QUESTION in decoded and "19" in decoded and "And 1 + 1?" in decoded


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_history_is_cut_oldest_turns_first_to_the_trained_length(tokenizer, template):
    notes: list[str] = []
    model = torch.nn.Linear(1, 1)  # prompt() decodes nothing
    turns = [("What is 7 + 12? Answer with the number only, please.", "19"),
             ("And what is 19 times 3? Just the number.", "57"),
             ("Now subtract 8 from that result.", "49")]
    history = [{"role": role, "content": text} for question, answer in turns
               for role, text in (("user", question), ("assistant", answer))]
    last = [{"role": "user", "content": "Finally, halve it."}]
    whole = len(conversation_ids(tokenizer, history + last, template))
    without_first = conversation_ids(tokenizer, history[2:] + last, template)
    # Room for an answer: max_new_tokens, at most half the trained length.
    chat = Chat(model, tokenizer, template, ChatOptions(max_new_tokens=10), len(without_first) + 10, notes.append)
    chat.history = history + last
    assert chat.prompt() == without_first  # one turn too long: the oldest question and answer go
    assert chat.history == history[2:] + last and len(notes) == 1 and "1 oldest turn(s) dropped" in notes[0]
    assert whole + 10 > chat.trained_length
    notes.clear()
    chat.history = history + last
    chat.trained_length = whole + 10
    assert chat.prompt() == conversation_ids(tokenizer, history + last, template) and not notes  # fits: kept whole
    chat.opts = ChatOptions(max_new_tokens=1000)  # room capped at half the trained length
    chat.trained_length = 2 * len(conversation_ids(tokenizer, last, template))
    chat.history = history + last
    assert chat.prompt() == conversation_ids(tokenizer, last, template) and chat.history == last
    assert "3 oldest turn(s) dropped" in notes[0] and len(notes) == 1
    notes.clear()
    chat.trained_length = 4  # the message alone is longer: kept, with a note
    assert chat.prompt() == conversation_ids(tokenizer, last, template)
    assert len(notes) == 1 and "longer than the model was trained on" in notes[0]


def test_sampling_knobs():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 1e-6, generator) for _ in range(20)} == {0}  # the nucleus is the top token
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(seed)) for seed in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert [sample(logits, 0.7, 0.9, torch.Generator().manual_seed(5)) for _ in range(3)] == \
        [sample(logits, 0.7, 0.9, torch.Generator().manual_seed(5)) for _ in range(3)]


def test_streamed_text_holds_partial_characters(tokenizer):
    text = "café 日本 🙂 done"
    pieces: list[str] = []
    answer = stream_text(tokenizer, iter(tokenizer(text, add_special_tokens=False)["input_ids"]), pieces.append)
    assert answer == text and "".join(pieces) == text
    assert len([p for p in pieces if p]) > 3
    assert not any("\ufffd" in piece for piece in pieces)


def test_prompt_answers_once_with_evaluations_greedy_tokens(adapter):
    result = run_cli(["launch/chat.py", "recipes/tiny_alpaca.yaml", f"adapter={adapter}", "chat.greedy=true",
                      "chat.max_new_tokens=12", "--prompt", QUESTION], env=ONE_THREAD, timeout=300)
    recipe = tiny_recipe()
    model, tokenizer, _ = load_adapted_model(recipe, adapter, torch.device("cpu"))
    prompt = prompt_tokens(tokenizer, {"instruction": QUESTION, "input": "", "output": ""}, "alpaca")
    expected = greedy_batch(model, [prompt], 12, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu"))
    expected_text = tokenizer.decode(expected[0], skip_special_tokens=True)
    assert expected_text.strip()
    assert result.stdout.strip() == expected_text.strip()


def test_prompt_flag_and_bad_options():
    assert split_prompt(["r.yaml", "--prompt", "hi there", "chat.greedy=true"]) == ("hi there", ["r.yaml", "chat.greedy=true"])
    assert split_prompt(["r.yaml", "--prompt=hi"]) == ("hi", ["r.yaml"])
    result = run_cli(["launch/chat.py", "recipes/tiny_alpaca.yaml", "adapter=none", "chat.top_p=1.5", "--prompt", "x"],
                     env=ONE_THREAD, check=False)
    assert result.returncode == 2 and "chat.top_p" in result.stderr
    assert ChatOptions().temperature > 0 and not ChatOptions().greedy


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_a_finite_number_0_or_more_is_refused_before_loading(temperature):
    from trainer.config import RecipeError
    from trainer.evaluation.chat import chat

    with pytest.raises(RecipeError, match="chat.temperature must be a finite number, 0 or more") as raised:
        chat(tiny_recipe(), ChatOptions(adapter="none", temperature=temperature), prompt="x")
    assert "top_p" not in str(raised.value) and "max_new_tokens" not in str(raised.value)  # only the one that failed


def test_bad_chat_settings_are_named_each_with_its_rule_and_only_those():
    from trainer.config import RecipeError
    from trainer.evaluation.chat import check_options

    with pytest.raises(RecipeError) as raised:
        check_options(ChatOptions(top_p=1.5, max_new_tokens=0))
    assert str(raised.value) == "chat.top_p must be in (0, 1], got 1.5; chat.max_new_tokens must be 1 or more, got 0"
    check_options(ChatOptions(temperature=0.0, top_p=1.0, max_new_tokens=1))  # the edges are allowed


@pytest.mark.parametrize("argv", [["--prompt", ""], ["--prompt=  "]])
def test_an_empty_prompt_is_refused_before_the_model_loads(argv, monkeypatch, capsys):
    import trainer.evaluation.chat as chat_module

    def no_loading(*args):
        raise AssertionError("the model was loaded for an empty --prompt")

    monkeypatch.setattr(chat_module, "load_for_chat", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        chat_module.main(["recipes/tiny_alpaca.yaml", "adapter=none", *argv])
    assert exit_info.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ['error: --prompt needs a message, got an empty one: --prompt "..."']


def test_chat_rows_are_chatted_with_the_chat_template_whatever_data_template_says(tmp_path, tiny_base):
    # Training renders rows in chat format with the chat template even under data.template=alpaca.
    import json

    from trainer.evaluation.chat import conversation_template

    adapter = make_checkpoint(tmp_path / "run")
    assert conversation_template(tiny_recipe(), str(adapter)) == "alpaca"
    assert conversation_template(tiny_recipe("data.format=chat"), "none") == "chat"
    assert conversation_template(tiny_recipe("data.template=chat"), "none") == "chat"
    meta = json.loads((adapter / "meta.json").read_text())
    (adapter / "meta.json").write_text(json.dumps({**meta, "chat_rendered": True}))  # found by data.format=auto
    assert conversation_template(tiny_recipe(), str(adapter)) == "chat"
    (adapter.parent / "best.json").write_text(json.dumps({"best": adapter.name}))  # where links are not allowed
    assert conversation_template(tiny_recipe(), str(adapter.parent / "best")) == "chat"
    exported = tmp_path / "merged"  # a merged export carries the checkpoint's meta.json
    exported.mkdir()
    (exported / "meta.json").write_text((adapter / "meta.json").read_text())
    assert conversation_template(tiny_recipe(), str(exported)) == "chat"


def _expect(master: int, pattern: str, seen: list[str], limit_s: float = 180) -> str:
    """Read the terminal until `pattern` appears after what was already consumed (a generous limit
    only so that a hang fails instead of blocking the suite)."""
    buffer = ""
    while pattern not in buffer:
        ready, _, _ = select.select([master], [], [], limit_s)
        if not ready:
            raise AssertionError(f"no {pattern!r} on the terminal; got {''.join(seen)[-2000:]!r}")
        chunk = os.read(master, 4096).decode(errors="replace")
        if not chunk:
            raise AssertionError(f"terminal closed before {pattern!r}; got {''.join(seen)[-2000:]!r}")
        buffer += chunk
        seen.append(chunk)
    return buffer


@contextmanager
def chat_in_a_terminal(*options: str):
    """launch/chat.py on a pseudo terminal: (the process, the terminal's end to read and write, what it
    printed so far). The process is killed if the test leaves it running; it must print no traceback."""
    master, slave = pty.openpty()
    command = [sys.executable, "launch/chat.py", "recipes/tiny_alpaca.yaml", *options]
    # Ctrl-C as a terminal gives it: a suite started in the background (`cmd &` without job control)
    # ignores SIGINT, and a child then inherits that, so Python would install no KeyboardInterrupt.
    process = subprocess.Popen(command, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                               env={**os.environ, **ONE_THREAD}, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen: list[str] = []
    try:
        yield process, master, seen
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert "Traceback" not in "".join(seen)


def test_interactive_session_in_a_pseudo_terminal(adapter):
    with chat_in_a_terminal(f"adapter={adapter}", "chat.max_new_tokens=8", "chat.temperature=0.8",
                            "chat.top_p=0.95") as (process, master, seen):
        banner = _expect(master, "you> ", seen)
        assert "/reset" in banner and "temperature 0.8" in banner
        os.write(master, (QUESTION + "\n").encode())
        answer = _expect(master, "you> ", seen)
        assert "assistant> " in answer
        os.write(master, b"And 1 + 1?\n")
        _expect(master, "you> ", seen)
        os.write(master, b"/reset\n")
        assert "(conversation cleared)" in _expect(master, "you> ", seen)
        os.write(master, b"/exit\n")
        assert process.wait(timeout=60) == 0


def stopped_streams(tokenizer, seen_prompts: list[list[int]]):
    """A stand-in for stream_tokens: the first answer is "Hello there" then Ctrl-C, later ones "Fine."."""
    def stream(model, prompt, opts, eos_ids, generator=None):
        seen_prompts.append(prompt)
        if len(seen_prompts) == 1:
            yield from tokenizer("Hello there", add_special_tokens=False)["input_ids"]
            raise KeyboardInterrupt
        yield from tokenizer("Fine.", add_special_tokens=False)["input_ids"]
    return stream


@contextmanager
def escaping_ctrl_c_fails():
    """A KeyboardInterrupt escaping a test would stop pytest itself: make it this test's failure."""
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped: the session would end with a traceback")


def test_ctrl_c_during_an_answer_keeps_what_was_shown_and_passes_it_on(tokenizer, monkeypatch):
    import trainer.evaluation.chat_session as session_module

    monkeypatch.setattr(session_module, "stream_tokens", stopped_streams(tokenizer, []))
    session = Chat(torch.nn.Linear(1, 1), tokenizer, "alpaca", ChatOptions(), 512, lambda text: None)
    shown: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        session.reply("Say hello.", shown.append)
    assert "".join(shown).strip() == "Hello there"
    assert session.history == [{"role": "user", "content": "Say hello."},
                               {"role": "assistant", "content": "Hello there"}]

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(session_module, "stream_tokens", interrupted_at_once)
    with pytest.raises(KeyboardInterrupt):
        session.reply("Anything?", shown.append)
    assert len(session.history) == 2  # nothing shown: the unanswered question leaves too


def test_ctrl_c_stops_an_answer_then_ends_the_session_at_the_prompt(tokenizer, monkeypatch, capsys):
    import builtins

    import trainer.evaluation.chat as chat_module
    import trainer.evaluation.chat_session as session_module

    prompts: list[list[int]] = []
    monkeypatch.setattr(session_module, "stream_tokens", stopped_streams(tokenizer, prompts))
    monkeypatch.setattr(chat_module, "load_for_chat", lambda *args: (torch.nn.Linear(1, 1), tokenizer))
    typed = iter(["Say hello.", "How are you?", KeyboardInterrupt])

    def type_in(prompt: str) -> str:
        line = next(typed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(builtins, "input", type_in)
    # Room for the history: the Alpaca prompt alone is most of tiny_alpaca's 160 tokens.
    with escaping_ctrl_c_fails():  # Ctrl-C at the prompt leaves as /exit does
        chat_module.chat(tiny_recipe("data.max_seq_len=1024"), ChatOptions(adapter="none"))
    out = capsys.readouterr().out
    assert "assistant> Hello there (stopped)\n" in out and "assistant> Fine." in out
    assert len(prompts) == 2 and "Hello there" in tokenizer.decode(prompts[1])  # the partial answer is history


def test_ctrl_c_during_a_prompt_answer_exits_130_without_a_traceback(tokenizer, monkeypatch, capsys):
    import trainer.evaluation.chat as chat_module
    import trainer.evaluation.chat_session as session_module

    monkeypatch.setattr(session_module, "stream_tokens", stopped_streams(tokenizer, []))
    monkeypatch.setattr(chat_module, "load_for_chat", lambda *args: (torch.nn.Linear(1, 1), tokenizer))
    with escaping_ctrl_c_fails(), pytest.raises(SystemExit) as exit_info:
        chat_module.main(["recipes/tiny_alpaca.yaml", "adapter=none", "--prompt", "Say hello."])
    assert exit_info.value.code == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_missing_gguf_file_is_named_with_its_option(tmp_path):
    result = run_cli(["launch/chat.py", "recipes/tiny_alpaca.yaml", f"adapter={tmp_path / 'missing.gguf'}",
                      "--prompt", "x"], env=ONE_THREAD, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: adapter={tmp_path / 'missing.gguf'}: no such .gguf file" in result.stderr
    assert "Traceback" not in result.stderr and "huggingface.co" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_of_a_terminal_session_ends_it_cleanly(adapter):
    with chat_in_a_terminal(f"adapter={adapter}", "chat.max_new_tokens=8") as (process, master, seen):
        _expect(master, "you> ", seen)
        # input() writes "you> " before it reads: a signal between the two waits for a line (CPython's
        # input()), which Enter then ends. A Ctrl-C ignored would leave it at a new "you> ".
        time.sleep(1)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.write(master, b"\n")
        assert process.wait(timeout=60) == 0
