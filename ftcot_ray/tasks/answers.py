"""Reading and grading answers, with the paper's rules.

These reproduce the original repo's ``Evaluator`` (itsnamgyu/reasoning-teacher,
src/evaluation/evaluator.py) rule for rule, because the paper's accuracies are only
reproducible with exactly its text cleaning:

* with a marker (``-->`` for Fine-tune-CoT, ``The answer is`` for few-shot-CoT): the first
  candidate after the marker; marker given but absent: the *last* candidate in the whole text;
* no marker (the teacher's step-2 answer, zero-shot): the first candidate.

Candidates per answer kind:

* ``choice``: every capital letter of ``task.choices`` anywhere in the text (``[ABCDE]`` for AQuA /
  CommonsenseQA, ``[A-F]`` for Date, ``[ABC]`` for Shuffled objects), exact match;
* ``number_float`` / ``number_exact``: commas dropped, then ``-?\\d+(\\.\\d+)?``; float kinds
  (AddSub, SVAMP, SingleEq) match within 1e-6, exact kinds (MultiArith, GSM8K) as strings,
  so ``"39.0"`` is wrong against ``"39"``;
* ``yesno``: lower-cased words (split on quotes, newlines, periods, whitespace, colons, commas)
  that are exactly ``yes`` or ``no``;
* ``letters``: the whole text with quotes, newlines, periods and whitespace removed (one candidate).

One deliberate difference: where the original yields an empty-string candidate for ``letters``
(nothing left after cleaning), we return ``None`` ("no answer"). Both grade as wrong.
"""

from __future__ import annotations

import re
from typing import Protocol


class AnswerRules(Protocol):
    """What the rules read of a task (tasks.base.Task has these): no import of Task, so no cycle."""

    name: str
    kind: str
    choices: str

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
# Same character classes as the original Evaluator.
YESNO_SEPARATORS_RE = re.compile(r"\"|'|\n|\.|\s|:|,")
LETTERS_STRIP_RE = re.compile(r"\"|'|\n|\.|\s")
DEFAULT_CHOICES = "ABCDE"
FLOAT_TOLERANCE = 1e-6


def candidates(task: AnswerRules, text: str) -> list[str]:
    """Every substring of `text` that has the shape of an answer of this task, in order."""
    text = text or ""
    kind = task.kind
    if kind == "choice":
        letters = task.choices or DEFAULT_CHOICES
        return re.findall(f"[{re.escape(letters)}]", text)
    if kind in ("number_float", "number_exact"):
        return NUMBER_RE.findall(text.replace(",", ""))
    if kind == "yesno":
        words = YESNO_SEPARATORS_RE.sub(" ", text.lower()).split(" ")
        return [w for w in words if w in ("yes", "no")]
    if kind == "letters":
        cleaned = LETTERS_STRIP_RE.sub("", text)
        return [cleaned] if cleaned else []
    raise ValueError(f"task {task.name!r}: unknown answer kind {kind!r}")


def extract_answer(task: AnswerRules, text: str, marker: str | None = None) -> str | None:
    """The task's answer read from `text` (None when there is no candidate)."""
    text = text or ""
    if marker is None:
        found, first = candidates(task, text), True
    else:
        at = text.find(marker)
        if at == -1:
            # The student forgot the marker: the paper falls back to the last candidate.
            found, first = candidates(task, text), False
        else:
            found, first = candidates(task, text[at + len(marker):]), True
    if not found:
        return None
    return found[0] if first else found[-1]


def clean_gold(task: AnswerRules, gold: str) -> str:
    """The gold answer as the Evaluator compares it (commas out of numbers, yes/no lower-cased)."""
    gold = str(gold).strip()
    if task.kind in ("number_float", "number_exact"):
        gold = gold.replace(",", "")
    elif task.kind == "yesno":
        gold = gold.lower()
    return gold


def is_correct(task: AnswerRules, prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    gold = clean_gold(task, gold)
    if task.kind == "number_float":
        try:
            gold_value = float(gold)
        except ValueError:
            raise ValueError(f"task {task.name!r}: gold answer {gold!r} is not a number") from None
        try:
            return abs(float(prediction) - gold_value) <= FLOAT_TOLERANCE
        except ValueError:
            return False
    return prediction == gold
