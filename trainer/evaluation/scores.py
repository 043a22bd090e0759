"""Scores of generated answers against references, written out so the definitions are visible.

    exact match        normalised prediction == normalised reference
    token F1           harmonic mean of precision and recall of the shared tokens (a multiset overlap)
    ROUGE-L            F-measure from the longest common subsequence of tokens (Lin 2004, beta = 1)
    final number       the prediction's final number equals the reference's (reference_number: GSM8K's
                       "#### 72", a reference ending in a number that stands alone, or a worked solution
                       whose last line reaches it after "=": "48+24 = 72 clips altogether."); only rows
                       whose reference has one are counted, and the summary says how many

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
# A "=" that states a result; "==", "<=", ">=" and "!=" compare.
_EQUALS = re.compile(r"(?<![=<>!])=(?!=)")
_CURRENCY = "$€£¥"
# After a result, what says it is not the whole number: the expression goes on ("= 5 * 3", "= 1/2",
# "= 1, 2"), thousands are spaced ("= 3 400"), or the decimals recur ("= 16.66...%", rounded after).
_CONTINUED = re.compile(r"\s*[-+*/×÷^x:,]\s*[\d.(]|\s\d{3}(?![\d-])|\.\.")
# What a worked step computes before its "=": an operator and a number after it ("48+24", "12 x 50/60",
# "6 minutes + 2 minutes", "$5 * 3"), which an assignment ("age = 30", "count = 0", "So x = 20") or an
# equation ("2x = 10") does not have.
_ARITHMETIC = re.compile(r"(?:[-+*/×÷–^]|\sx)\s*[($€£¥]*\s*\.?\d")
# Not prose: code or a tool call ("timedelta(days=100);", "wolfram('solve 3x + 2 = 14 for x')").
_CODE = re.compile(r"[()\[\]{};`\"=<>|\\]|(?<![A-Za-z])'|'(?![A-Za-z])")


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
    """The reference's final answer as a number, None when it has none (the row is then not counted).
    In order:

    1. GSM8K's marker: the first number after "####".
    2. A number that ends the text (trailing punctuation aside) and stands alone: not the last of a
       list "0 3 4 8" or "1, 2", a fraction "1/2", a time "3:45" or a date "2024-01-05".
    3. A worked solution (GSM8K without its "####" line, as in AlpacaDataCleaned's copy): one step per
       line, the last reaching the answer, then words. "Natalia sold 48+24 = 72 clips altogether in
       April and May." -> 72; "... = $5 more." -> 5; "It will take her 120/24 = 5 hours to read 120
       pages." -> 5 (numbers after the result describe it). See worked_number.

    Free text is not searched for a number: "Founded in 1998, it grew fast." has no final answer, and
    neither has a last line that never states a result with "=" ("Lee earned $558 mowing lawns").
    """
    return _reference_answer(reference)[0]


def _reference_answer(reference: str) -> tuple[Decimal | None, bool]:
    """reference_number, and whether it came from rule 3 (a worked solution)."""
    if "####" in reference:
        return _after_marker(reference), False
    ending = _ending_number(reference)
    if ending is not None:
        return ending, False
    worked = worked_number(reference)
    return worked, worked is not None


def _after_marker(text: str) -> Decimal | None:
    found = _numbers(text.rsplit("####", 1)[1])
    return _as_number(found[0][2]) if found else None


def _ending_number(reference: str) -> Decimal | None:
    text = reference.rstrip(_TRAILING)
    found = _numbers(text)
    if not found or found[-1][1] != len(text):
        return None
    before = text[:found[-1][0]].rstrip()
    if before[-1:].isdigit() or (before[-1:] and before[-1] in _JOINERS and before[-2:-1].isdigit()):
        return None  # the last of several numbers ("0 3 4 8", "1/2", "3:45"): not one answer
    return _as_number(found[-1][2])


def worked_number(text: str) -> Decimal | None:
    """The result a worked solution's last line reaches: the number right after its last "=" (a
    currency sign between them allowed), whatever words follow it. None when that line has no "="
    ("==", "<=", ">=" and "!=" compare, they do not state a result), when what comes before it computes
    nothing (an assignment "age = 30", an equation "2x = 10"), when no number follows it
    ("20 = A"), when the expression goes on ("= 5 * 3", "= 1/2", "= 3:45"), or when what follows is
    not prose: in code and tool calls an "=" assigns or poses an equation ("timedelta(days=100)",
    "wolfram('solve 3x + 2 = 14 for x')")."""
    last_line = text.strip().rsplit("\n", 1)[-1]
    pieces = _EQUALS.split(last_line)
    if len(pieces) < 2 or not _ARITHMETIC.search(pieces[-2]):
        return None
    after = pieces[-1].lstrip(" \t" + _CURRENCY)
    found = _numbers(after)
    if not found or found[0][0] != 0:
        return None
    rest = after[found[0][1]:].rstrip(" \t.!?\"'")  # a sentence's end, a stray closing quote
    if _CONTINUED.match(rest) or _CODE.search(rest):
        return None
    return _as_number(found[0][2])


def prediction_number(prediction: str, worked: bool = False) -> Decimal | None:
    """The prediction's final answer: the first number after "####" if it wrote one, else its last
    number. `worked`: the reference is a worked solution (reference_number's rule 3), so a prediction
    written the same way is read the same way, by worked_number, before its last number ("= 5 hours to
    read 120 pages" answers 5, not 120)."""
    if "####" in prediction and (marked := _after_marker(prediction)) is not None:
        return marked
    if worked and (result := worked_number(prediction)) is not None:
        return result
    found = _numbers(prediction)
    return _as_number(found[-1][2]) if found else None


def final_number_correct(prediction: str, reference: str) -> bool | None:
    """None when the reference has no final number (the row is then left out of the accuracy)."""
    expected, worked = _reference_answer(reference)
    if expected is None:
        return None
    return prediction_number(prediction, worked) == expected


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
