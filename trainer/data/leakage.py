"""Train/held-out leakage: a held-out instruction that also appears in the training rows measures
memory, not generalisation. Rows are compared on their normalised instruction + input
(lowercase, whitespace collapsed, stripped); exact duplicates are dropped from train by default
(data.drop_leaked).

Tokenised examples carry `question_id(row)`, a number standing for the row's key, so the check
runs on examples (and on examples read back from the tokenised cache) as well as on rows.
"""
from __future__ import annotations

import hashlib


def row_key(row: dict) -> str:
    """What makes two rows the same question: instruction and input, normalised. A chat row's
    user turns stand in for them."""
    if "messages" in row:
        text = "\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")
    else:
        text = f"{row['instruction']}\n{row.get('input', '')}"
    return " ".join(text.lower().split())


def question_id(row: dict) -> int:
    """`row_key` as a 63-bit number (fits an int64 array in the cache); collisions are negligible."""
    return int.from_bytes(hashlib.blake2b(row_key(row).encode(), digest_size=8).digest(), "big") >> 1


def leakage_note(n_leaked: int, n_train: int, n_eval: int, dropped: bool = True) -> str | None:
    """The line to print before training, or None when nothing leaked."""
    if n_leaked == 0:
        return None
    outcome = "dropped from train" if dropped else "kept in train (data.drop_leaked: false)"
    return (f"leakage: {n_leaked:,} of {n_train:,} training rows repeat one of the {n_eval:,} held-out questions "
            f"(normalised instruction + input); {outcome}")
