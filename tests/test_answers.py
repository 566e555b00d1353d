"""The paper's answer rules (tasks/answers.py), one behaviour per test; no files, no Ray."""

from __future__ import annotations

import pytest

from ftcot_ray.tasks.base import Task

EXACT = Task("t_exact", "number_exact")  # MultiArith, GSM8K
FLOAT = Task("t_float", "number_float")  # AddSub, SVAMP, SingleEq
CHOICE5 = Task("t_choice", "choice", choices="ABCDE")  # AQuA, CommonsenseQA
CHOICE3 = Task("t_choice3", "choice", choices="ABC")  # Shuffled objects
YESNO = Task("t_yesno", "yesno")  # StrategyQA, Coin Flip
LETTERS = Task("t_letters", "letters")  # Last letter concatenation


# --------------------------------------------------------------------------- markers


def test_marker_present_takes_first_candidate_after_it():
    assert EXACT.extract_answer("I had 3 then 5 --> 8 or 9", marker="-->") == "8"


def test_marker_missing_takes_last_candidate_in_text():
    assert EXACT.extract_answer("I had 3 then 5 so 8", marker="-->") == "8"


def test_no_marker_takes_first_candidate():
    # The teacher's step-2 completion (zero-shot-CoT) is read from its start.
    assert EXACT.extract_answer(" 12 apples. Then 14.") == "12"


def test_few_shot_marker():
    text = "5 + 3 = 8. The answer is 8. Q: 11"
    assert EXACT.extract_answer(text, marker="The answer is") == "8"


def test_marker_present_but_nothing_after_it_is_no_answer():
    # The original Evaluator does not fall back when the marker exists: no candidate after it -> None.
    assert EXACT.extract_answer("so 7 --> ", marker="-->") is None


def test_no_candidate_is_none_and_graded_wrong():
    assert EXACT.extract_answer("no digits here") is None
    assert not EXACT.is_correct(None, "3")


# --------------------------------------------------------------------------- numbers


def test_commas_dropped_in_numbers():
    assert EXACT.extract_answer("--> 1,234,567 dollars", marker="-->") == "1234567"
    assert EXACT.is_correct("1234567", "1,234,567")


def test_negative_and_decimal_numbers():
    assert EXACT.candidates("from -3 to 2.75 and 4.") == ["-3", "2.75", "4"]


def test_dollar_sign_and_trailing_period():
    assert EXACT.extract_answer(" $39.") == "39"


def test_exact_numbers_compare_as_strings():
    # MultiArith / GSM8K: "39.0" is not "39" (the paper's exact string match).
    assert EXACT.is_correct("39", "39")
    assert not EXACT.is_correct("39.0", "39")


def test_float_numbers_compare_within_tolerance():
    assert FLOAT.is_correct("39", "39.0")
    assert FLOAT.is_correct("0.333333", "0.3333333333333333")  # 3.3e-7 off: inside 1e-6
    assert not FLOAT.is_correct("0.33333", "0.3333333333333333")  # 3.3e-6 off: outside


def test_float_gold_with_commas():
    assert FLOAT.is_correct("1000", "1,000")


def test_float_gold_not_a_number_is_a_clear_error():
    with pytest.raises(ValueError, match="not a number"):
        FLOAT.is_correct("3", "three")


# --------------------------------------------------------------------------- choices


def test_choice_letters_first_without_marker():
    assert CHOICE5.extract_answer(" (B) 12 apples, not (C).") == "B"


def test_choice_only_task_letters_count():
    # Shuffled objects only has A-C: a capital D/E in the text is not a candidate.
    assert CHOICE3.candidates("Dave and Eve pick (B)") == ["B"]


def test_choice_lowercase_letters_are_not_candidates():
    assert CHOICE5.candidates("a b c (D)") == ["D"]


def test_choice_exact_match():
    assert CHOICE5.is_correct("A", "A")
    assert not CHOICE5.is_correct("B", "A")


# --------------------------------------------------------------------------- yes/no


def test_yesno_lowercased_and_split_on_punctuation():
    assert YESNO.extract_answer(' "Yes." because no one') == "yes"
    assert YESNO.candidates("No,yes:maybe\nYES") == ["no", "yes", "yes"]


def test_yesno_words_inside_other_words_do_not_count():
    assert YESNO.candidates("nothing yesterday knows") == []


def test_yesno_gold_lowercased():
    # StrategyQA golds are "Yes"/"No".
    assert YESNO.is_correct("yes", "Yes")
    assert not YESNO.is_correct("no", "Yes")


def test_yesno_marker_missing_takes_last():
    assert YESNO.extract_answer("yes it flips, so no", marker="-->") == "no"


# --------------------------------------------------------------------------- letters


def test_letters_strip_spaces_quotes_periods():
    assert LETTERS.extract_answer(' "y a j o".\n') == "yajo"
    assert LETTERS.is_correct("yajo", "yajo")


def test_letters_take_everything_after_marker():
    assert LETTERS.extract_answer("last letters y, a --> yajo", marker="-->") == "yajo"


def test_letters_keep_other_punctuation():
    # Only quotes, periods and whitespace go (as in the paper); a comma stays and makes it wrong.
    assert LETTERS.extract_answer("ya,jo") == "ya,jo"


def test_letters_empty_text_is_no_answer():
    assert LETTERS.extract_answer(' ". ') is None


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown answer kind"):
        Task("weird", "nope").candidates("1")  # type: ignore[arg-type]
