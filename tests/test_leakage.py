from trainer.leakage import drop_leaked, leakage_note, leaked_train_indices, row_key


def row(instruction, input_="", output="x"):
    return {"instruction": instruction, "input": input_, "output": output}


def test_questions_are_compared_normalised_and_answers_ignored():
    assert row_key(row("  Reverse   the WORD. ", "cat")) == row_key(row("reverse the word.", "cat", "other"))
    assert row_key(row("Reverse the word.", "cat")) != row_key(row("Reverse the word.", "dog"))
    chat = {"messages": [{"role": "user", "content": "Hi  there"}, {"role": "assistant", "content": "x"}]}
    assert row_key(chat) == "hi there"


def test_drop_leaked_removes_train_duplicates_of_held_out_questions():
    train = [row("Reverse the word.", "cat"), row("Add the two numbers.", "1 + 2"), row("REVERSE the word.", " cat ")]
    held_out = [row("reverse the word.", "cat", "tac"), row("Count the words.", "a b")]
    assert leaked_train_indices(train, held_out) == [0, 2]
    kept, dropped = drop_leaked(train, held_out)
    assert kept == [train[1]] and dropped == 2
    assert "2 of 3 training rows" in leakage_note(dropped, len(train), len(held_out))
    assert drop_leaked(train, []) == (train, 0) and leakage_note(0, 3, 0) is None
