"""Evaluation logic as plain functions on records: prompts per method, answer reading, grading,
self-consistency vote, metrics, the teacher's own row. No Ray here (stages/evaluate.py wires it).

Methods (the `method` label in metrics.json, which the report groups by):
  ft_cot        a Fine-tune-CoT student: `{q} ###` -> ` {rationale} --> {answer}`; answer after `-->`
  vanilla       a student fine-tuned on ` {answer}`: the first candidate of the output
  step_by_step  distilling step-by-step: `[label] {q} ###` -> ` {answer}` (the label task); first candidate
  zero_shot     prompting: `Q: {q}\\nA: Therefore, the answer is` -> first candidate
  zero_shot_cot prompting in two steps (Kojima et al., as the teacher is asked) -> first candidate of step 2
  few_shot_cot  the paper's exemplars + `Q: {q}\\nA:` -> answer after `The answer is`
  teacher       the teacher's own step-2 answers from the curate stage

Where we differ from the paper: a Fine-tune-CoT output without `-->` is counted wrong and not
well-formed (a choice of ours; `eval.require_marker=false` restores the paper's fallback to the last
candidate). Few-shot-CoT keeps the paper's fallback.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

from . import prompts
from .tasks import answers

MARKERS: dict[str, Optional[str]] = {
    "ft_cot": prompts.FT_COT_MARKER,
    "vanilla": None,
    "step_by_step": None,  # the label task answers directly: its first candidate
    "zero_shot": None,
    "zero_shot_cot": prompts.ANSWER_TRIGGER,  # the step-2 answer follows the last trigger in the output
    "few_shot_cot": prompts.FEW_SHOT_MARKER,
    "teacher": None,
}
METHODS = tuple(MARKERS)
BASELINES = ("zero_shot", "zero_shot_cot", "few_shot_cot")
# Prompted models run on past their answer into a next "Q:"; cut there (the paper's API calls stop there too).
PROMPT_STOPS = ("\nQ:", "\n\nQ")


# --------------------------------------------------------------------------- prompts


def _few_shot_data() -> dict:
    path = resources.files("ftcot_ray") / "prompts_data" / "few_shot_cot.json"
    return json.loads(path.read_text())


def few_shot_exemplars(dataset: str) -> list[dict]:
    """The paper's exemplars for `dataset` as [{question, rationale, answer}] (synthetic tasks use their paper twin)."""
    data = _few_shot_data()
    key = data["aliases"].get(dataset, dataset)
    if key not in data["datasets"]:
        raise KeyError(
            f"no few-shot-CoT exemplars for dataset {dataset!r} (the paper ships them for: "
            f"{', '.join(sorted(data['datasets']))}; synthetic aliases: {', '.join(sorted(data['aliases']))})"
        )
    return data["datasets"][key]["exemplars"]


def render_exemplars(exemplars: Sequence[dict]) -> str:
    """`Q: {q}\\nA: {rationale} The answer is {answer}.\\n` per exemplar: the authors' prompt text + '\\n'."""
    return "".join(
        f"Q: {e['question']}\nA: {e['rationale']} {prompts.FEW_SHOT_MARKER} {e['answer']}.\n" for e in exemplars
    )


def first_prompt(method: str, question: str, family: str = "decoder", exemplars: str | None = None) -> str:
    """The first (often only) prompt of a method for one question."""
    if method in ("ft_cot", "vanilla", "step_by_step"):
        return prompts.method_prompt(method, question, family)
    if method == "zero_shot":
        return prompts.zero_shot_prompt(question)
    if method == "zero_shot_cot":
        return prompts.reasoning_prompt(question)
    if method == "few_shot_cot":
        if exemplars is None:
            raise ValueError("few_shot_cot needs the exemplar block (few_shot_exemplars + render_exemplars)")
        return prompts.few_shot_cot_prompt(exemplars, question)
    raise ValueError(f"unknown eval method {method!r}; methods: {', '.join(METHODS)}")


def zero_shot_cot_answer_prompt(question: str, rationale: str) -> str:
    """Step 2 of zero-shot-CoT: `{step-1 prompt}{rationale}\nTherefore, the answer is`."""
    return prompts.answer_prompt(question, rationale)


def zero_shot_cot_output(rationale: str, answer_text: str) -> str:
    """The recorded output of a two-step zero-shot-CoT answer (graded after the last trigger)."""
    return f"{rationale}\n{prompts.ANSWER_TRIGGER}{answer_text}"


def is_prompted(method: str) -> bool:
    return method in BASELINES


def cut_at_stop(text: str, stops: Iterable[str] = PROMPT_STOPS) -> str:
    cut = len(text)
    for s in stops:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


# --------------------------------------------------------------------------- answers


def read_prediction(task, output: str, method: str, require_marker: bool = True) -> tuple[Optional[str], bool]:
    """(prediction, well_formed) for one output, with the method's answer rule."""
    marker = MARKERS.get(method)
    if method not in MARKERS:
        raise ValueError(f"unknown eval method {method!r}; methods: {', '.join(METHODS)}")
    if marker is None:
        pred = answers.extract_answer(task, output, None)
        return pred, pred is not None
    if method == "zero_shot_cot":  # we wrote the trigger ourselves; the rationale may repeat it, so take the last
        pred = answers.extract_answer(task, output.rsplit(marker, 1)[-1], None)
        return pred, pred is not None
    has_marker = marker in output
    if not has_marker and method == "ft_cot" and require_marker:
        return None, False
    pred = answers.extract_answer(task, output, marker)
    return pred, has_marker and pred is not None


def _vote_key(task, answer: str):
    # Equal numbers written differently ("6" / "6.0") are one vote where the task compares floats.
    if getattr(task, "kind", None) == "number_float":
        try:
            return round(float(answer), 6)
        except ValueError:
            return answer
    return answer


def majority_vote(answers: Sequence[Optional[str]], task=None) -> Optional[str]:
    """Self-consistency: the most frequent answer; ties go to the earliest sample's answer;
    None (no answer) does not vote unless every sample is None."""
    keyed = [(i, a, _vote_key(task, a)) for i, a in enumerate(answers) if a is not None]
    if not keyed:
        return None
    counts = Counter(k for _, _, k in keyed)
    best = max(counts.values())
    for _, a, k in keyed:  # in sample order: the first answer with the top count wins ties
        if counts[k] == best:
            return a
    return None  # unreachable


def grade_row(task, row: dict, method: str, require_marker: bool = True) -> dict:
    """A problem row with `outputs` (k generations) and optional `output_tokens` -> a predictions row."""
    outputs = list(row["outputs"])
    if not outputs:
        raise ValueError(f"sample_index {row.get('sample_index')}: no outputs to grade")
    read = [read_prediction(task, o, method, require_marker) for o in outputs]
    preds = [p for p, _ in read]
    gold = row["answer"]
    voted = majority_vote(preds, task) if len(preds) > 1 else preds[0]
    tokens = list(row.get("output_tokens") or [])
    out = {
        "sample_index": row["sample_index"],
        "question": row.get("question"),
        "answer": gold,
        "output": outputs[0],
        "prediction": voted,
        "correct": answers.is_correct(task, voted, gold),
        "well_formed": read[0][1],
        "output_tokens": tokens[0] if tokens else None,
        "error": row.get("error"),
    }
    if row.get("rationale") is not None:  # a step-by-step student's rationale task, when asked for
        out["rationale"] = row["rationale"]
    if len(outputs) > 1:
        out |= {
            "samples": outputs,
            "sample_predictions": preds,
            "prediction_at_1": preds[0],
            "correct_at_1": answers.is_correct(task, preds[0], gold),
            "samples_well_formed": sum(w for _, w in read),
            "samples_output_tokens": tokens,
        }
    return out


def grade_batch(rows: Iterable[dict], task, method: str, require_marker: bool = True) -> list[dict]:
    """Predictions rows of a batch of generated rows (a replica's timing, when given, carried along)."""
    out = []
    for r in rows:
        graded = grade_row(task, r, method, require_marker)
        if r.get("gen_seconds") is not None:
            graded["gen_seconds"] = float(r["gen_seconds"])
        out.append(graded)
    return out


def batch_metrics(predictions: Sequence[dict], k: int = 1) -> dict:
    """The counts `metrics_from_parts` adds up, for one batch of predictions."""
    toks = [p["output_tokens"] for p in predictions if p.get("output_tokens") is not None]
    return {"n": len(predictions), "correct": sum(bool(p["correct"]) for p in predictions),
            "well_formed": sum(bool(p["well_formed"]) for p in predictions), "tokens": sum(toks),
            "tokens_n": len(toks), "correct_at_1": sum(bool(p.get("correct_at_1")) for p in predictions) if k > 1 else 0,
            "errors": sum(p.get("error") is not None for p in predictions),
            "gen_seconds": sum(p.get("gen_seconds") or 0.0 for p in predictions)}


def metrics_from_parts(parts: Sequence[dict], k: int = 1) -> dict:
    """accuracy (at k when k > 1), counts, well-formed share, mean output tokens, from `batch_metrics`."""
    total = {key: sum(p[key] for p in parts) for key in ("n", "correct", "well_formed", "tokens", "tokens_n",
                                                          "correct_at_1")}
    n = total["n"]
    m = {
        "accuracy": total["correct"] / n if n else 0.0,
        "n": n,
        "correct": total["correct"],
        "well_formed": total["well_formed"] / n if n else 0.0,
        "mean_output_tokens": total["tokens"] / total["tokens_n"] if total["tokens_n"] else None,
        "k": k,
    }
    if k > 1:
        at1 = total["correct_at_1"]
        m |= {"accuracy_at_1": at1 / n if n else 0.0, "accuracy_at_k": m["accuracy"], "correct_at_1": at1}
    return m


def compute_metrics(predictions: Sequence[dict], k: int = 1) -> dict:
    return metrics_from_parts([batch_metrics(predictions, k)], k)


# --------------------------------------------------------------------------- teacher row


def teacher_metrics(curate_dir: str | Path, split: str = "test") -> dict:
    """The teacher's own accuracy on `split`, from the curate stage's curated table (first sample per
    question, sample_idx 0, i.e. its greedy / first answer; a failed API call counts as wrong), streamed."""
    from .tables import has_table, iter_table, table_path

    if not has_table(curate_dir, "curated"):
        raise FileNotFoundError(f"{table_path(curate_dir, 'curated')}: no curated table; run `ftcot curate` first")
    columns = ("split", "sample_idx", "correct")  # the rest is read when there (.get)
    n = correct = well_formed = errors = tokens = tokens_n = 0
    model = None
    for batch in iter_table(curate_dir, "curated", columns):
        for r in batch:
            if r.get("split") != split or int(r.get("sample_idx", 0)) != 0:
                continue
            n += 1
            correct += bool(r.get("correct"))
            well_formed += r.get("prediction") is not None
            errors += r.get("error") is not None
            model = model or r.get("model")
            if isinstance(r.get("completion_tokens"), (int, float)):
                tokens += r["completion_tokens"]
                tokens_n += 1
    if not n:
        raise ValueError(f"{table_path(curate_dir, 'curated')}: no teacher completions for split {split!r} "
                         "(teacher.splits must include it)")
    return {
        "method": "teacher",
        "student": model,
        "split": split,
        "dataset": _curate_dataset(Path(curate_dir)),
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "well_formed": well_formed / n,
        "mean_output_tokens": tokens / tokens_n if tokens_n else None,
        "errors": errors,
        "k": 1,
    }


def _curate_dataset(curate_dir: Path) -> Optional[str]:
    """The dataset name from the stage's resolved config.yaml (curated rows do not carry it)."""
    import yaml

    path = curate_dir / "config.yaml"
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("dataset")
