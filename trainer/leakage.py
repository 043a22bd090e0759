"""Train/held-out leakage: a held-out instruction that also appears in the training rows measures
memory, not generalisation. Rows are compared on their normalised instruction + input
(lowercase, whitespace collapsed, stripped); exact duplicates are dropped from train by default.
"""
from __future__ import annotations


def row_key(row: dict) -> str:
    """What makes two rows the same question: instruction and input, normalised. A chat row's
    user turns stand in for them."""
    if "messages" in row:
        text = "\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")
    else:
        text = f"{row['instruction']}\n{row.get('input', '')}"
    return " ".join(text.lower().split())


def leaked_train_indices(train_rows: list[dict], eval_rows: list[dict]) -> list[int]:
    """Positions of the training rows whose question is also a held-out one."""
    held_out = {row_key(row) for row in eval_rows}
    return [index for index, row in enumerate(train_rows) if row_key(row) in held_out]


def drop_leaked(train_rows: list[dict], eval_rows: list[dict]) -> tuple[list[dict], int]:
    """The training rows without those that duplicate a held-out question, and how many went."""
    leaked = set(leaked_train_indices(train_rows, eval_rows))
    return [row for index, row in enumerate(train_rows) if index not in leaked], len(leaked)


def leakage_note(n_dropped: int, n_train: int, n_eval: int) -> str | None:
    """The line to print before training, or None when nothing leaked."""
    if n_dropped == 0:
        return None
    return (f"leakage: {n_dropped} of {n_train} training rows repeat one of the {n_eval} held-out questions "
            f"(normalised instruction + input); dropped from train")
