"""Curate the teacher's completions: grade, filter, carve a validation split, format training pairs.

Plain functions on records (the completions table of the teach stage), unit-tested without Ray;
``stages/curate.py`` runs them over Ray Data batches. What crosses batches is kept small: a
`ProblemIndex` (per question: its split and a hash of its text, 9 bytes) and per-batch counters
(`batch_counts`), added up on the driver.

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
from typing import Iterable, Optional

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


def problems_from_completions(rows: list[dict], dataset: str) -> list[dict]:
    """Problems rebuilt from completions when no problems table is at hand: each question's sample 0
    (every question has one, so any batch of the completions gives each question once)."""
    return [{"sample_index": int(r["sample_index"]), "question": r["question"], "answer": r["answer"],
             "split": r["split"], "dataset": dataset} for r in rows if int(r["sample_idx"]) == 0]


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


# --------------------------------------------------------------------------- over batches (the stage's Ray Data maps)


SPLIT_CODES = ("train", "val", "test")


def question_hash(question: str) -> int:
    """64 bits of the question's text, stripped: what says a completion belongs to a problem."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(str(question).strip().encode(), digest_size=8).digest(), "little") >> 1


class ProblemIndex:
    """Per question (sorted sample_index): its split code and its text's hash, as numpy arrays: what a
    grading batch needs of the problems table (about 17 bytes a question, shared through the object store)."""

    def __init__(self, indices, splits, hashes):
        self.indices, self.splits, self.hashes = indices, splits, hashes

    @classmethod
    def of(cls, rows) -> "ProblemIndex":
        """From an iterable of problem rows (streamed: a batch at a time)."""
        import numpy as np

        idx, spl, hsh = [], [], []
        for r in rows:
            idx.append(int(r["sample_index"]))
            spl.append(SPLIT_CODES.index(r["split"]) if r["split"] in SPLIT_CODES else -1)
            hsh.append(question_hash(r["question"]))
        order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
        return cls(np.asarray(idx, dtype=np.int64)[order], np.asarray(spl, dtype=np.int8)[order],
                   np.asarray(hsh, dtype=np.int64)[order])

    def with_val(self, val_fraction: float, val_seed: int) -> "ProblemIndex":
        """The same questions with a val split carved out of train (`carve_val`)."""
        import numpy as np

        _, val = carve_val(self.indices[self.splits == 0].tolist(), val_fraction, val_seed)
        splits = self.splits.copy()
        splits[np.searchsorted(self.indices, np.asarray(val, dtype=np.int64))] = 1
        return ProblemIndex(self.indices, splits, self.hashes)

    def lookup(self, sample_index: int) -> tuple[Optional[str], Optional[int]]:
        """(split, question hash) of a question, or (None, None) when it is not in the table."""
        import numpy as np

        i = int(np.searchsorted(self.indices, sample_index))
        if i >= len(self.indices) or self.indices[i] != sample_index:
            return None, None
        code = int(self.splits[i])
        return (SPLIT_CODES[code] if code >= 0 else None), int(self.hashes[i])

    def counts(self) -> dict[str, int]:
        import numpy as np

        return {SPLIT_CODES[c]: int(n) for c, n in zip(*np.unique(self.splits, return_counts=True)) if c >= 0}


def grade_batch(rows: list[dict], task: Task, diversity: int, drop_truncated: bool = True,
                problems: Optional[ProblemIndex] = None, where: str = "completions") -> list[dict]:
    """The first `diversity` samples of each question + prediction, correct, kept, reject_reason
    (duplicates are marked apart: `mark_duplicates`). With `problems`, each row takes its question's
    (carved) split, and a completion whose question the problems table does not hold, or holds with
    other text, is an error naming it."""
    out = []
    for row in within_diversity(rows, diversity):
        split = check_question(row, problems, where) if problems is not None else row["split"]
        graded = grade(row, task)
        reason = first_reject_reason(graded, drop_truncated)
        out.append(graded | {"kept": reason is None, "reject_reason": reason, "split": split or row["split"]})
    return out


def check_question(row: dict, problems: ProblemIndex, where: str) -> str:
    """The (carved) split of a completion's question; an error when the problems table lacks it or
    holds another text under its sample_index (teach and data run with different data configs)."""
    split, h = problems.lookup(int(row["sample_index"]))
    if h is None:
        raise DataError(f"{where}: completion for sample_index {row['sample_index']} has no problem in the data "
                        "stage's problems table")
    if h != question_hash(row["question"]):
        raise DataError(f"{where}: sample_index {row['sample_index']}: the completion's question differs from the "
                        "data stage's (teach and data were run with different data configs?)")
    return split or row["split"]


def batch_counts(rows: list[dict]) -> dict:
    """The counters `curation_stats` adds up, for one batch of curated rows (sorted by question): which
    questions have a kept train/val rationale are given as the batch's first and last such question and
    the count of distinct ones, so a question cut across two batches is counted once (`add_counts`)."""
    c: Counter = Counter()
    kept_questions = []
    for r in rows:
        group = "train" if r["split"] in TRAIN_SPLITS else r["split"]
        c["rows"] += 1
        if r.get("error") is None:
            c[f"answered_{group}"] += 1
            c[f"correct_{group}"] += bool(r["correct"])
        if r["reject_reason"] is not None:
            c[f"reject_{r['reject_reason']}"] += 1
        if r["kept"]:
            c[f"kept_{r['split']}"] += 1
            if r["split"] in TRAIN_SPLITS and (not kept_questions or kept_questions[-1] != int(r["sample_index"])):
                kept_questions.append(int(r["sample_index"]))
        if r["split"] in TRAIN_SPLITS:
            c[f"train_{r['reject_reason'] or 'kept'}"] += 1
    return {"counts": dict(c), "kept_questions": len(kept_questions),
            "first": kept_questions[0] if kept_questions else None, "last": kept_questions[-1] if kept_questions else None}


def add_counts(parts: list[dict]) -> tuple[Counter, int]:
    """(summed counters, questions with a kept train/val rationale) from `batch_counts` in table order."""
    total: Counter = Counter()
    questions, last = 0, None
    for p in parts:
        total.update(p["counts"])
        questions += p["kept_questions"] - (1 if p["first"] is not None and p["first"] == last else 0)
        last = p["last"] if p["last"] is not None else last
    return total, questions


def key_order(rows: list[dict]) -> dict:
    """A batch's first and last (sample_index, sample_idx) and how often a key is smaller than the one before."""
    keys = [(int(r["sample_index"]), int(r["sample_idx"])) for r in rows]
    return {"first": keys[0] if keys else None, "last": keys[-1] if keys else None,
            "backwards": sum(a > b for a, b in zip(keys, keys[1:]))}


def in_question_order(parts: list[dict]) -> bool:
    """Whether batches described by `key_order`, in table order, make a table sorted by question, then sample."""
    last = None
    for p in parts:
        if p["backwards"] or (last is not None and p["first"] is not None and tuple(p["first"]) < tuple(last)):
            return False
        last = p["last"] if p["last"] is not None else last
    return True


def stats_from_counts(c: Counter, questions_with_kept: int, problem_splits: dict[str, int], pairs: dict,
                      diversity: int) -> dict:
    """`curation_stats`, from counters (the stage never holds the rows)."""
    def acc(group: str) -> Optional[float]:
        n = c.get(f"answered_{group}", 0)
        return round(c.get(f"correct_{group}", 0) / n, 4) if n else None

    answered_all = sum(c.get(f"answered_{g}", 0) for g in ("train", "test"))
    correct_all = sum(c.get(f"correct_{g}", 0) for g in ("train", "test"))
    train_questions = sum(problem_splits.get(s, 0) for s in TRAIN_SPLITS)
    kept = sum(c.get(f"kept_{s}", 0) for s in TRAIN_SPLITS)
    return {
        "diversity": diversity,
        "rows": c.get("rows", 0),
        "teacher_accuracy": {"train": acc("train"), "test": acc("test"),
                             "all": round(correct_all / answered_all, 4) if answered_all else None},
        "kept_rows": kept,
        "kept_by_split": {s: c[f"kept_{s}"] for s in TRAIN_SPLITS if c.get(f"kept_{s}")},
        "train_questions": train_questions,
        "questions_with_kept": questions_with_kept,
        "mean_kept_per_question": round(kept / train_questions, 4) if train_questions else 0.0,
        "rejects": {reason: c.get(f"reject_{reason}", 0) for reason in REJECT_REASONS},
        "splits": dict(problem_splits),
        "pairs": pairs,
    }


def check_kept(c: Counter, where: str) -> None:
    """No kept training rationale -> an error that names the cause (the most common reject reason)."""
    if sum(c.get(f"kept_{s}", 0) for s in TRAIN_SPLITS):
        return
    reasons = Counter({r: c.get(f"train_{r}", 0) for r in REJECT_REASONS if c.get(f"train_{r}", 0)})
    n = sum(reasons.values())
    if not n:
        raise DataError(f"{where}: no completions of training questions (teacher.splits must include 'train')")
    top, _ = reasons.most_common(1)[0]
    counts = ", ".join(f"{k}={v}" for k, v in reasons.most_common())
    raise DataError(f"{where}: no rationale kept of {n} training completions ({counts}): {_HINTS[top]}")


# --------------------------------------------------------------------------- stats and the empty case


_HINTS = {
    "api_error": "every call failed: check the teacher endpoint (teacher.base_url), its key and the teach logs",
    "truncated": "every rationale hit teacher.max_tokens: raise it, or set curate.drop_truncated=false",
    "no_answer": "the teacher's step-2 answers hold no answer of this task's kind: check teacher.model and data.dataset",
    "wrong_answer": "the teacher answered every training question wrongly: check teacher.model and the dataset's answers",
    "duplicate": "every rationale was a duplicate",
}


def check_some_kept(curated: list[dict], where: str) -> None:
    """No kept training rationale -> an error that names the cause (the most common reject reason)."""
    check_kept(Counter(batch_counts(curated)["counts"]), where)
