"""Curate the teacher's completions: grade, filter, carve a validation split, format training pairs.

Plain functions on records (the completions table of the teach stage), unit-tested without Ray;
``stages/curate.py`` only wires files to them.

Fine-tune-CoT keeps a rationale only when the teacher's answer is correct, and formats it with the
GOLD answer (the authors' ``Formatter``: ``" {reasoning_completion.strip()} --> {answer.strip()}"``,
question and answer stripped too); vanilla fine-tuning uses every training question's gold answer.
Where we differ from the paper:
* a validation split is carved out of train per question (the paper picked the best epoch on test);
* ``curate.drop_truncated`` (default on) drops rationales cut at the teacher's max_tokens; the paper
  kept them (6 of its 323 MultiArith rationales), so replays of the paper set it false;
* ``curate.dedup`` (default off) drops repeated rationales of one question (diverse reasoning at
  temperature 0.7 sometimes yields the same text twice).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import numpy as np

from .errors import DataError
from .prompts import ft_cot_completion, rationale_completion, student_prompt, task_prompt, vanilla_completion
from .tasks.base import Task

# Why a row was not kept, in the order they are checked (the first that applies is reported).
REJECT_REASONS = ("api_error", "truncated", "no_answer", "wrong_answer", "duplicate")
TRAIN_SPLITS = ("train", "val")


# --------------------------------------------------------------------------- checks


def check_diversity(rows: list[dict], diversity: int) -> int:
    """D_max of the table; a D above it is an error (silently training on fewer samples would mislead)."""
    d_max = max((int(r["sample_idx"]) for r in rows), default=-1) + 1
    if diversity > d_max:
        raise DataError(
            f"curate.diversity={diversity} but the teach output holds only {d_max} sample(s) per question: "
            f"re-run teach with teacher.samples>={diversity}, or lower curate.diversity"
        )
    return d_max


# --------------------------------------------------------------------------- grading and filtering


def within_diversity(rows: Iterable[dict], diversity: int) -> list[dict]:
    """The first D samples of each question (samples are drawn once; any D <= D_max reads a prefix)."""
    return [r for r in rows if int(r["sample_idx"]) < diversity]


def grade(row: dict, task: Task) -> dict:
    """prediction from the teacher's step-2 answer (no marker: the first candidate), correct vs gold."""
    if row.get("error") is not None or row.get("answer_completion") is None:
        return row | {"prediction": None, "correct": False}
    prediction = task.extract_answer(row["answer_completion"])
    return row | {"prediction": prediction, "correct": task.is_correct(prediction, str(row["answer"]))}


def first_reject_reason(row: dict, drop_truncated: bool) -> str | None:
    """api_error / truncated / no_answer / wrong_answer for a graded row (duplicates come later)."""
    if row.get("error") is not None:
        return "api_error"
    if drop_truncated and row.get("finish_reason") == "length":
        return "truncated"
    if row["prediction"] is None:
        return "no_answer"
    if not row["correct"]:
        return "wrong_answer"
    return None


def normalise_rationale(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().lower())


def mark_duplicates(rows: list[dict]) -> None:
    """Among kept rows, a rationale already kept for the same question (lowest sample_idx wins)."""
    seen: set[tuple[int, str]] = set()
    for row in sorted(rows, key=lambda r: (int(r["sample_index"]), int(r["sample_idx"]))):
        if row["reject_reason"] is not None:
            continue
        key = (int(row["sample_index"]), normalise_rationale(row["rationale"]))
        if key in seen:
            row["reject_reason"], row["kept"] = "duplicate", False
        else:
            seen.add(key)


def curate_rows(rows: Iterable[dict], task: Task, diversity: int, drop_truncated: bool = True, dedup: bool = False) -> list[dict]:
    """Completions (sample_idx < D) + prediction, correct, kept, reject_reason; sorted by question, sample."""
    out = []
    for row in within_diversity(rows, diversity):
        graded = grade(row, task)
        reason = first_reject_reason(graded, drop_truncated)
        out.append(graded | {"kept": reason is None, "reject_reason": reason})
    if dedup:
        mark_duplicates(out)
    return sorted(out, key=lambda r: (int(r["sample_index"]), int(r["sample_idx"])))


# --------------------------------------------------------------------------- validation split


def carve_val(train_indices: Iterable[int], val_fraction: float, val_seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sample indices: a seeded share of the training QUESTIONS, so all samples of one
    question land on the same side (no rationale of a val question is trained on)."""
    train = sorted(int(i) for i in train_indices)
    n_val = int(round(val_fraction * len(train)))
    if val_fraction > 0 and n_val == 0 and len(train) >= 2:
        n_val = 1  # a non-empty val split whenever one is asked for and possible
    order = np.random.RandomState(val_seed).permutation(len(train))
    val = sorted(train[i] for i in order[:n_val])
    val_set = set(val)
    return [i for i in train if i not in val_set], val


def with_val_split(problems: list[dict], val_fraction: float, val_seed: int) -> list[dict]:
    """problems with a val split carved out of train; test stays test."""
    _, val = carve_val((p["sample_index"] for p in problems if p["split"] == "train"), val_fraction, val_seed)
    val_set = set(val)
    return [p | {"split": "val"} if p["sample_index"] in val_set else dict(p) for p in problems]


def apply_splits(rows: list[dict], problems: list[dict]) -> list[dict]:
    """Each completion row takes its question's split from the (carved) problems table."""
    split_of = {int(p["sample_index"]): p["split"] for p in problems}
    return [r | {"split": split_of.get(int(r["sample_index"]), r["split"])} for r in rows]


def problems_from_completions(rows: list[dict], dataset: str) -> list[dict]:
    """The problems table rebuilt from completions (one per question) when no data stage is at hand."""
    by_index: dict[int, dict] = {}
    for r in rows:
        i = int(r["sample_index"])
        by_index.setdefault(i, {"sample_index": i, "question": r["question"], "answer": r["answer"],
                                "split": r["split"], "dataset": dataset})
    return [by_index[i] for i in sorted(by_index)]


def check_problems_match(problems: list[dict], rows: list[dict], where: str) -> None:
    """The completions were made for these problems (same question text per sample_index)."""
    question_of = {int(p["sample_index"]): p["question"] for p in problems}
    for r in rows:
        i = int(r["sample_index"])
        if i not in question_of:
            raise DataError(f"{where}: completion for sample_index {i} has no problem in the data stage's problems table")
        if question_of[i].strip() != str(r["question"]).strip():
            raise DataError(
                f"{where}: sample_index {i}: the completion's question differs from the data stage's "
                f"(teach and data were run with different data configs?)"
            )


# --------------------------------------------------------------------------- training pairs


def ft_cot_pairs(curated: Iterable[dict], family: str) -> list[dict]:
    """Kept train/val rationales as the paper formats them, with the GOLD answer."""
    return [
        {
            "sample_index": r["sample_index"],
            "sample_idx": r["sample_idx"],
            "split": r["split"],
            "prompt": student_prompt(str(r["question"]).strip(), family),
            "completion": ft_cot_completion(str(r["rationale"]), str(r["answer"]).strip(), family),
        }
        for r in curated
        if r["kept"] and r["split"] in TRAIN_SPLITS
    ]


def step_by_step_pairs(curated: Iterable[dict], family: str) -> list[dict]:
    """Distilling step-by-step: each kept train/val rationale gives two pairs of one example, the label
    task (`[label] q` -> gold answer) and the rationale task (`[rationale] q` -> the rationale). The same
    curated rationales as Fine-tune-CoT, so the two methods are compared on the same data."""
    out = []
    for r in curated:
        if not (r["kept"] and r["split"] in TRAIN_SPLITS):
            continue
        q = str(r["question"]).strip()
        base = {"sample_index": r["sample_index"], "sample_idx": r["sample_idx"], "split": r["split"]}
        out.append(base | {"task": "label", "prompt": task_prompt("label", q, family),
                           "completion": vanilla_completion(str(r["answer"]).strip(), family)})
        out.append(base | {"task": "rationale", "prompt": task_prompt("rationale", q, family),
                           "completion": rationale_completion(str(r["rationale"]), family)})
    return out


def vanilla_pairs(problems: Iterable[dict], family: str) -> list[dict]:
    """Every train/val question with its gold answer (no teacher involved)."""
    return [
        {
            "sample_index": p["sample_index"],
            "sample_idx": 0,
            "split": p["split"],
            "prompt": student_prompt(str(p["question"]).strip(), family),
            "completion": vanilla_completion(str(p["answer"]).strip(), family),
        }
        for p in problems
        if p["split"] in TRAIN_SPLITS
    ]


# --------------------------------------------------------------------------- stats and the empty case


def _accuracy(rows: list[dict]) -> float | None:
    # Rows with an API error carry no answer of the teacher's: counted apart, not as wrong.
    answered = [r for r in rows if r.get("error") is None]
    return round(sum(bool(r["correct"]) for r in answered) / len(answered), 4) if answered else None


def curation_stats(curated: list[dict], problems: list[dict], n_ft_cot: int, n_vanilla: int, diversity: int,
                   n_step_by_step: int = 0) -> dict:
    train_rows = [r for r in curated if r["split"] in TRAIN_SPLITS]
    kept = [r for r in train_rows if r["kept"]]
    train_questions = [p for p in problems if p["split"] in TRAIN_SPLITS]
    covered = {int(r["sample_index"]) for r in kept}
    return {
        "diversity": diversity,
        "rows": len(curated),
        # Over every completion with sample_idx < D; "train" includes the carved val questions.
        "teacher_accuracy": {
            "train": _accuracy(train_rows),
            "test": _accuracy([r for r in curated if r["split"] == "test"]),
            "all": _accuracy(curated),
        },
        "kept_rows": len(kept),
        "kept_by_split": dict(Counter(r["split"] for r in kept)),
        "train_questions": len(train_questions),
        "questions_with_kept": len(covered),
        # Kept rationales per training question (questions with none count as 0).
        "mean_kept_per_question": round(len(kept) / len(train_questions), 4) if train_questions else 0.0,
        "rejects": {reason: sum(r["reject_reason"] == reason for r in curated) for reason in REJECT_REASONS},
        "splits": dict(Counter(p["split"] for p in problems)),
        "pairs": {"ft_cot": n_ft_cot, "vanilla": n_vanilla, "step_by_step": n_step_by_step},
    }


_HINTS = {
    "api_error": "every call failed: check the teacher endpoint (teacher.base_url), its key and the teach logs",
    "truncated": "every rationale hit teacher.max_tokens: raise it, or set curate.drop_truncated=false",
    "no_answer": "the teacher's step-2 answers hold no answer of this task's kind: check teacher.model and data.dataset",
    "wrong_answer": "the teacher answered every training question wrongly: check teacher.model and the dataset's answers",
    "duplicate": "every rationale was a duplicate",
}


def check_some_kept(curated: list[dict], where: str) -> None:
    """No kept training rationale -> an error that names the cause (the most common reject reason)."""
    train_rows = [r for r in curated if r["split"] in TRAIN_SPLITS]
    if any(r["kept"] for r in train_rows):
        return
    if not train_rows:
        raise DataError(f"{where}: no completions of training questions (teacher.splits must include 'train')")
    reasons = Counter(r["reject_reason"] for r in train_rows)
    top, _ = reasons.most_common(1)[0]
    counts = ", ".join(f"{k}={v}" for k, v in reasons.most_common())
    raise DataError(f"{where}: no rationale kept of {len(train_rows)} training completions ({counts}): {_HINTS[top]}")

