"""Answer scores (trainer/evaluation/scores.py): exact match, token F1, ROUGE-L and final-number accuracy on
hand-worked examples, and how a set of rows is summarised."""
import json
from decimal import Decimal
from pathlib import Path

import pytest

from trainer.evaluation.scores import (exact_match, final_number_correct, format_table, longest_common_subsequence,
                                  normalise, prediction_number, reference_number, rouge_l, score, summarise,
                                  token_f1)

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_train.json"


def test_exact_match_ignores_case_punctuation_and_spacing_but_not_signs():
    assert exact_match("  The CAT sat.", "the cat sat") == 1.0
    assert exact_match("GNIR", "gnir") == 1.0
    assert exact_match("cat", "cats") == 0.0
    assert exact_match("-3", "3") == 0.0
    assert exact_match("1,234", "1234.") == 1.0
    assert exact_match("a", "") == 0.0
    assert normalise("covid-19, 3-5!") == "covid 19 3 5"


def test_token_f1_counts_shared_tokens_as_a_multiset():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("dog", "cat") == 0.0
    # prediction "cat cat dog" vs reference "cat dog": 2 shared, precision 2/3, recall 1
    assert token_f1("cat cat dog", "cat dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_rouge_l_is_the_lcs_f_measure_over_tokens():
    assert longest_common_subsequence("a b c d e".split(), "a x c y e".split()) == 3
    assert longest_common_subsequence([], ["a"]) == 0
    # LCS("a b c d", "a c d e") = "a c d" = 3: precision 3/4, recall 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for token F1
    assert token_f1("d c b a", "a b c d") == 1.0
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert rouge_l("The Cat.", "the cat") == 1.0


@pytest.mark.parametrize("reference, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", Decimal(72)),
    ("#### 1,234", Decimal(1234)),
    ("The answer is 1,234.", Decimal(1234)),
    ("so the total is -3.5", Decimal("-3.5")),
    ("#### -12", Decimal(-12)),
    ("It costs $1,200.50!", Decimal("1200.50")),
    ("The answer is 72", Decimal(72)),
    ("Version 2 is out", None),  # a number, but not at the end
    ("no number here", None),
    ("covid-19", Decimal(19)),  # a hyphen, not a minus
    ("1 - 2 = -1", Decimal(-1)),
    ("The answer is .5", Decimal("0.5")),
    # The last of several numbers is not one answer: a list (the tasks' sorted digits), a fraction,
    # a time, a date.
    ("0 3 4 8", None),
    ("1, 2, 3", None),
    ("I have 3 apples, so 5", Decimal(5)),
    ("1/2", None),
    ("It starts at 3:45.", None),
    ("2024-01-05", None),
])
def test_reference_final_number(reference, expected):
    assert reference_number(reference) == expected


@pytest.mark.parametrize("reference, expected", [
    # GSM8K without its "####" line (AlpacaDataCleaned's copy): the last line reaches the answer after "=".
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.",
     Decimal(72)),
    ("Her grandparents gave her 15 * 2 = $30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $5 more.", Decimal(5)),
    ("It will take her 120/24 = 5 hours to read 120 pages.", Decimal(5)),  # numbers after the result describe it
    ("Since 1000-240 = 760, they need to make 760 more cards.", Decimal(760)),
    ("So she should run for 6/3=.5 hour", Decimal("0.5")),
    ("Step one = 3.\nSo 17 000/5 = 3 400.", None),  # spaced thousands: not the number 3
    ("= 66.666...%, which rounds up to 67%", None),  # a recurring decimal, rounded after
    ("The total is 5 * 4 = 20 * 3 pieces", None),  # the expression goes on
    ("Subtracting 2b from both sides, we get 10 = b", None),
    ("x = 10.\nThe bat has a long life.", None),  # the last line states no result
    # Free text and code: an "=" that assigns, compares or poses an equation is not an answer.
    ("Founded in 1998, the company grew fast.", None),
    ("The value of x is: wolfram('solve 3x + 2 = 14 for x').", None),
    ("The date is python('today + timedelta(days=100); result').", None),
    ("if len(items) == 10 then stop", None),
])
def test_reference_final_number_of_a_worked_solution(reference, expected):
    assert reference_number(reference) == expected


def test_a_worked_reference_reads_the_prediction_the_same_way():
    reference = "She reads 24 pages an hour.\nIt will take her 120/24 = 5 hours to read 120 pages."
    assert final_number_correct(reference, reference) is True  # its last number, 120, is not the answer
    assert final_number_correct("The answer is 5.", reference) is True
    assert final_number_correct("It takes 120/24 = 6 hours to read 120 pages.", reference) is False
    assert final_number_correct("#### 5", reference) is True
    # A "####" or numeric-ending reference reads the prediction's last number, as before.
    assert final_number_correct("So x = 3, and the answer is 12 apples", "#### 12") is True


@pytest.mark.skipif(not GSM8K.exists(), reason="no ../shared/data/gsm8k_train.json")
def test_the_shared_gsm8k_copy_is_scored_on_almost_every_row():
    # Its answers lost their "#### N" line and mostly end in words: before the worked-solution rule
    # only 1,909 of 7,473 rows were scored (those whose last line ends in the number).
    rows = json.loads(GSM8K.read_text())
    found = [reference_number(row["output"]) for row in rows]
    assert sum(number is not None for number in found) >= 0.95 * len(rows)  # 7,170 (the rest state no computed result last)
    assert found[0] == Decimal(72) and found[1] == Decimal(10)
    assert all(final_number_correct(row["output"], row["output"]) is not False for row in rows)


def test_prediction_number_takes_the_gsm8k_marker_else_the_last_number():
    assert prediction_number("3 + 4 = 7, then 7 * 2 = 14. #### 14") == Decimal(14)
    assert prediction_number("First 3, then 4, so the answer is 12.") == Decimal(12)
    assert prediction_number("It is 72.0") == Decimal(72)
    assert prediction_number("no idea") is None


def test_final_number_correct_compares_values_not_text():
    assert final_number_correct("The answer is 72.", "#### 72") is True
    assert final_number_correct("72.0", "The answer is 72") is True
    assert final_number_correct("1234", "The answer is 1,234.") is True
    assert final_number_correct("-3.5", "so -3.5") is True
    assert final_number_correct("3.5", "so -3.5") is False
    assert final_number_correct("anything", "gnir") is None  # not a numeric reference
    assert final_number_correct("0.5", ".5") is True and final_number_correct("5", ".5") is False
    assert final_number_correct("8", "0 3 4 8") is None  # a list: exact match scores it


def test_a_leading_decimal_point_is_part_of_the_number():
    assert normalise(".5 and -.25") == "0.5 and -0.25"
    assert exact_match("0.5", ".5") == 1.0 and exact_match("5", ".5") == 0.0
    assert normalise("v1.2.3") == "v 1.2 3"  # a point after a digit or letter is not a decimal point


def test_summary_averages_and_counts_numeric_rows_only():
    scores = [score("gnir", "gnir"), score("7", "12"), score("The answer is 12", "#### 12")]
    summary = summarise(scores)
    assert summary["rows"] == 3
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["final_number_rows"] == 2 and summary["final_number_accuracy"] == 0.5
    table = format_table({**summary, "eval_loss": 1.5, "eval_ppl": 4.48})
    for label in ("exact match", "token F1", "ROUGE-L", "final-number accuracy (2 rows)", "held-out loss"):
        assert label in table
    assert "33.33%" in table


def test_summary_without_numeric_references_leaves_the_accuracy_out():
    summary = summarise([score("cat", "cat")])
    assert summary["final_number_accuracy"] is None
    assert "final-number" not in format_table(summary)


def test_an_assignment_or_an_equation_is_no_worked_result():
    """Only a step that computes (an operator and a number before its "=") states a result: code, SQL and
    equations in free-text references are not scored as final numbers."""
    for reference in ["SELECT name FROM users WHERE age = 30 ORDER BY name", "count = 0  # reset the counter",
                      "x = 5 satisfies 2x = 10 for the equation."]:
        assert reference_number(reference) is None, reference
    assert reference_number("So the pie costs 6 dollars + 2 dollars = 8 dollars in all.") == Decimal(8)
