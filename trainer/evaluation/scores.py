"""Scores of generated answers against references, written out so the definitions are visible.

    exact match        normalised prediction == normalised reference
    token F1           harmonic mean of precision and recall of the shared tokens (a multiset overlap)
    ROUGE-L            F-measure from the longest common subsequence of tokens (Lin 2004, beta = 1)
    final number       the last number of the prediction equals the reference's final number
                       (GSM8K's "#### 72", or a reference ending in a number that stands alone:
                       not the last of a list "0 3 4 8" or "1, 2", a fraction "1/2", a time "3:45" or a
                       date "2024-01-05"); only rows whose reference has one are counted

Normalisation: lowercase, punctuation removed outside numbers (so "-3.5" stays itself, "1,234"
becomes "1234" and ".5" becomes "0.5"), whitespace collapsed. Articles are kept: in our tasks "a"
can be the whole answer.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation

_PUNCTUATION = str.maketrans("", "", string.punctuation)
# "1,234", "-3.5", ".5"; a comma is only taken between digits, so "1, 2" is two numbers.
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
# What joins a number to the one before it into something else: "1/2", "3:45", "2024-01-05", "3.14.1",
# or into a list: "1, 2, 3".
_JOINERS = "/:-.,"
_TRAILING = " \t\n.,;:!?)]}\"'*`"


def normalise(text: str) -> str:
    pieces, last = [], 0
    for start, end, value in _numbers(text):
        pieces += [text[last:start].translate(_PUNCTUATION), value.replace(",", "")]
        last = end
    pieces.append(text[last:].translate(_PUNCTUATION))
    return " ".join(" ".join(pieces).lower().split())


def tokens(text: str) -> list[str]:
    return normalise(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(first: list[str], second: list[str]) -> int:
    """Classic dynamic programme, one row at a time: O(len(first) * len(second)) time."""
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = longest_common_subsequence(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------ final numbers


def _numbers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, digits) of every number, "1,234" and "-3.5" included, ".5" written "0.5". A minus
    glued to a word or another number ("covid-19", "3-5") is a hyphen, not a sign; a point glued to a
    word or a number ("v.2", "1.2.3") is not a decimal point."""
    found = []
    for match in _NUMBER.finditer(text):
        value, start = match.group(), match.start()
        if value.startswith("-") and start > 0 and text[start - 1].isalnum():
            value, start = value[1:], start + 1
        if value.lstrip("-").startswith("."):
            if start > 0 and text[start - 1].isalnum():
                value, start = value[1:], start + 1  # "1.2.3": "1.2", then 3
            else:
                value = value.replace(".", "0.", 1)
        found.append((start, match.end(), value))
    return found


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def reference_number(reference: str) -> Decimal | None:
    """The reference's final answer as a number: the first number after GSM8K's "####", else a
    number that ends the text (trailing punctuation aside). None when there is no such number."""
    if "####" in reference:
        found = _numbers(reference.rsplit("####", 1)[1])
        return _as_number(found[0][2]) if found else None
    text = reference.rstrip(_TRAILING)
    found = _numbers(text)
    if not found or found[-1][1] != len(text):
        return None
    before = text[:found[-1][0]].rstrip()
    if before[-1:].isdigit() or (before[-1:] and before[-1] in _JOINERS and before[-2:-1].isdigit()):
        return None  # the last of several numbers ("0 3 4 8", "1/2", "3:45"): not one answer
    return _as_number(found[-1][2])


def prediction_number(prediction: str) -> Decimal | None:
    """The prediction's final answer: the first number after "####" if it wrote one, else its last number."""
    if "####" in prediction:
        found = _numbers(prediction.rsplit("####", 1)[1])
        if found:
            return _as_number(found[0][2])
    found = _numbers(prediction)
    return _as_number(found[-1][2]) if found else None


def final_number_correct(prediction: str, reference: str) -> bool | None:
    """None when the reference has no final number (the row is then left out of the accuracy)."""
    expected = reference_number(reference)
    if expected is None:
        return None
    return prediction_number(prediction) == expected


# ------------------------------------------------------------------------------ over a set


def score(prediction: str, reference: str) -> dict[str, float | bool | None]:
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference),
            "final_number_correct": final_number_correct(prediction, reference)}


def summarise(scores: list[dict]) -> dict[str, float | int | None]:
    """Means over rows; final-number accuracy over the rows whose reference ends in a number."""
    count = len(scores)
    summary: dict[str, float | int | None] = {"rows": count}
    for name in ("exact_match", "token_f1", "rouge_l"):
        summary[name] = sum(s[name] for s in scores) / count if count else None
    numbered = [s["final_number_correct"] for s in scores if s["final_number_correct"] is not None]
    summary["final_number_rows"] = len(numbered)
    summary["final_number_accuracy"] = sum(numbered) / len(numbered) if numbered else None
    return summary


def format_table(summary: dict) -> str:
    rows = [("rows", str(summary["rows"]))]
    for name, label in (("exact_match", "exact match"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L")):
        rows.append((label, _percent(summary[name])))
    if summary["final_number_rows"]:
        rows.append((f"final-number accuracy ({summary['final_number_rows']} rows)",
                     _percent(summary["final_number_accuracy"])))
    for name, label in (("eval_loss", "held-out loss"), ("eval_ppl", "held-out perplexity")):
        if summary.get(name) is not None:
            rows.append((label, f"{summary[name]:.4f}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    lines += [f"{label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:6.2f}%"
