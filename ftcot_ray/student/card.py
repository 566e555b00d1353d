"""The student card: what training saves beside an exported model so it is used as it was trained.

`ftcot_student.json` in the student folder says how to prompt the model (the paper's ` ###`
suffix for decoder-only students, none for T5), where its answer is (after `-->` for
Fine-tune-CoT, the first candidate for vanilla), and the task's answer rules. `ftcot eval` and
`ftcot serve` read it; nothing guesses the format from the architecture.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputFileError
from ..prompts import FT_COT_MARKER, method_prompt, task_prompt

CARD = "ftcot_student.json"
FORMAT = "ftcot-student/1"


@dataclass(frozen=True)
class AnswerRules:
    """A task's answer rules by value (tasks.answers reads name, kind, choices)."""

    name: str
    kind: str
    choices: str = ""


@dataclass(frozen=True)
class StudentCard:
    family: str  # decoder | encoder-decoder
    method: str  # ft_cot | vanilla
    dataset: str
    rules: AnswerRules
    max_length: int
    answer_marker: Optional[str]  # "-->" for Fine-tune-CoT, None: the first candidate
    format: str = FORMAT

    def prompt(self, question: str) -> str:
        """The prompt the student was trained on, for a plain question (step-by-step: the label task)."""
        return method_prompt(self.method, question.strip(), self.family)

    def rationale_prompt(self, question: str) -> str | None:
        """Step-by-step students also write a rationale when asked with the rationale task; others: None."""
        return task_prompt("rationale", question.strip(), self.family) if self.method == "step_by_step" else None

    def to_json(self) -> dict:
        return asdict(self)


def card_for(family: str, method: str, dataset: str, rules, max_length: int) -> StudentCard:
    return StudentCard(family=family, method=method, dataset=dataset,
                       rules=AnswerRules(rules.name, rules.kind, getattr(rules, "choices", "") or ""),
                       max_length=max_length, answer_marker=FT_COT_MARKER if method == "ft_cot" else None)


def write_card(folder: Path | str, card: StudentCard) -> Path:
    path = Path(folder) / CARD
    path.write_text(json.dumps(card.to_json(), indent=2) + "\n")
    return path


def read_card(folder: Path | str) -> Optional[StudentCard]:
    """The card of a student folder; None for a plain Hugging Face folder that has none."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return StudentCard(family=d["family"], method=d["method"], dataset=d["dataset"],
                           rules=AnswerRules(**d["rules"]), max_length=int(d["max_length"]),
                           answer_marker=d.get("answer_marker"), format=d.get("format", FORMAT))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputFileError(f"{path}: not a valid student card ({type(e).__name__}: {e})") from None
