"""The Task type: how a dataset loads, splits, and how its answers are read and graded."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from . import answers

AnswerKind = Literal["number_float", "number_exact", "choice", "yesno", "letters"]

# (question, rng, error_rate) -> (rationale, answer); raises ValueError for a question not of this task.
TeacherSim = Callable[[str, random.Random, float], tuple[str, str]]


@dataclass(frozen=True)
class Task:
    name: str
    kind: AnswerKind
    choices: str = ""  # letters for multiple choice, e.g. "ABCDE"
    synthetic: bool = False
    # load(source, data_cfg) -> unified records [{sample_index, question, answer}], list order = sample_index
    load: Optional[Callable] = field(default=None, compare=False, repr=False)
    # split(records, data_cfg) -> {"train": [sample_index...], "test": [...]}; None: the paper's 70/30 seed-0 split
    split: Optional[Callable] = field(default=None, compare=False, repr=False)
    teacher_sim: Optional[TeacherSim] = field(default=None, compare=False, repr=False)
    # (question, rationale) -> the answer the simulated teacher gives at step 2, read from its own rationale
    teacher_answer: Optional[Callable[[str, str], str]] = field(default=None, compare=False, repr=False)
    # (source, data_cfg) -> the files `load` reads (their content keys the data stage); None: `source` itself
    source_files: Optional[Callable] = field(default=None, compare=False, repr=False)
    note: str = ""  # e.g. "AQuA: test split only in ../shared"

    def candidates(self, text: str) -> list[str]:
        return answers.candidates(self, text)

    def extract_answer(self, text: str, marker: str | None = None) -> str | None:
        return answers.extract_answer(self, text, marker)

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        return answers.is_correct(self, prediction, gold)
