"""The 12 benchmarks of the paper: raw files -> unified records, splits, answer kinds.

Each loader turns Kojima et al.'s raw benchmark files (``zero_shot_cot/dataset``) into
``[{sample_index, question, answer}]`` exactly as Fine-tune-CoT did (itsnamgyu/reasoning-teacher,
notebooks/old/Data Preparation.ipynb), checked record for record against the authors' unified
dataset files. ``source`` is that raw folder, or one dataset's own raw file.

Multiple-choice questions are verbalised ``<question> Answer choices: (A) x, (B) y, ... .`` with a
letter answer; BigBench tasks (Date, Shuffled objects) also get ``\\nWhich choice is true?`` and
Date's choices are shuffled by one seed-0 ``RandomState`` running over the whole file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InputMissing
from ..io import InputFileError, read_json, read_text_lines
from .registry import register
from .base import Task
from .splits import (
    AQUA_TRAIN_SIZE,
    COMMONSENSE_QA_SIZES,
    GSM8K_SIZES,
    aqua_split,
    ordered_split,
)

# Raw file (or folder) of each dataset inside the zero_shot_cot/dataset folder.
RAW_PATHS = {
    "single_eq": "SingleEq/questions.json",
    "addsub": "AddSub/AddSub.json",
    "multiarith": "MultiArith/MultiArith.json",
    "gsm8k": "grade-school-math/test.jsonl",
    "aqua": "AQuA",
    "svamp": "SVAMP/SVAMP.json",
    "date_understanding": "Bigbench_Date/task.json",
    "tracking_shuffled_objects": "Bigbench_object_tracking/task.json",
    "last_letter_concatenation": "last_letters/last_letters.json",
    "coin_flip": "coin_flip/coin_flip.json",
    "commonsense_qa": "CommonsenseQA",
    "strategy_qa": "StrategyQA/task.json",
}
ZERO_SHOT_COT_HINT = "../shared/datasets/zero_shot_cot/dataset"


# --------------------------------------------------------------------------- paths


def raw_path(key: str, source: str | Path | None) -> Path:
    """The raw file/folder of `key`: `source` itself when it is a file, else source/<RAW_PATHS[key]>."""
    if source is None:
        raise InputMissing(
            f"dataset {key!r} needs data.source: the raw benchmark folder (e.g. {ZERO_SHOT_COT_HINT}) "
            f"or its file {RAW_PATHS[key]}"
        )
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise InputMissing(f"data.source {source} does not exist")
    path = source / RAW_PATHS[key]
    if not path.exists():
        raise InputMissing(f"dataset {key!r}: {path} not found (data.source={source} should be {ZERO_SHOT_COT_HINT})")
    return path


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row:
        raise InputFileError(f"{where}: missing field {name!r}")
    return row[name]


def _numbered(rows: list[dict], start: int = 0) -> list[dict]:
    return [{"sample_index": start + i, **row} for i, row in enumerate(rows)]


# --------------------------------------------------------------------------- verbalising


def verbalize_choices(question: str, choices: list[str], answer_index: int) -> tuple[str, str]:
    """`<q> Answer choices: (A) x, (B) y.` and the answer letter (as the paper)."""
    listed = ", ".join(f"({chr(ord('A') + i)}) {c.strip()}" for i, c in enumerate(choices))
    return f"{question} Answer choices: {listed}.", chr(ord("A") + answer_index)


# --------------------------------------------------------------------------- arithmetic


def _equation_files(path: Path, key: str) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a JSON list of {key} problems")
    return data


def _equation_loader(key: str, label: str, record: Callable[[dict, str], dict]) -> Callable:
    """A loader for one of the JSON-list arithmetic files; `record(raw, where)` makes one question."""
    def load(source, data_cfg=None) -> list[dict]:
        path = raw_path(key, source)
        return _numbered([record(s, f"{path}: record {i}") for i, s in enumerate(_equation_files(path, label))])

    load.__name__ = f"load_{key}"
    return load


def _single_eq(s: dict, where: str) -> dict:
    return {"question": _field(s, "sQuestion", where), "answer": str(_field(s, "lSolutions", where)[0])}


def _addsub(s: dict, where: str) -> dict:
    return {"question": _field(s, "sQuestion", where).strip(), "answer": str(_field(s, "lSolutions", where)[0])}


def _multiarith(s: dict, where: str) -> dict:
    # All MultiArith solutions are whole numbers stored as floats: "39", not "39.0".
    return {"question": _field(s, "sQuestion", where).strip(), "answer": str(int(_field(s, "lSolutions", where)[0]))}


def _svamp(s: dict, where: str) -> dict:
    question = _field(s, "Body", where).strip() + " " + _field(s, "Question", where).strip()
    return {"question": question, "answer": str(_field(s, "Answer", where))}


load_single_eq = _equation_loader("single_eq", "SingleEq", _single_eq)
load_addsub = _equation_loader("addsub", "AddSub", _addsub)
load_multiarith = _equation_loader("multiarith", "MultiArith", _multiarith)
load_svamp = _equation_loader("svamp", "SVAMP", _svamp)


def _gsm8k_rows(path: Path) -> list[dict]:
    rows = []
    for lineno, s in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        solution = _field(s, "answer", where)
        if solution.count("####") != 1:
            raise InputFileError(f"{where}: answer must contain one '#### <number>'")
        # The answer keeps its commas ("1,000"), as in the paper; grading drops them.
        rows.append({"question": _field(s, "question", where), "answer": solution[solution.find("####") + 5:]})
    return rows


def find_gsm8k_train(source, data_cfg=None) -> Path:
    """GSM8K's train.jsonl: data.gsm8k_train, else a `grade_school_math` folder beside zero_shot_cot."""
    explicit = getattr(data_cfg, "gsm8k_train", None)
    if explicit:
        path = Path(explicit)
        path = path / "train.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise InputMissing(f"data.gsm8k_train: {path} not found")
        return path
    tried = []
    if source is not None:
        for parent in list(Path(source).resolve().parents)[:4]:
            for rel in ("grade_school_math/grade_school_math/data/train.jsonl", "grade_school_math/data/train.jsonl"):
                tried.append(parent / rel)
                if tried[-1].is_file():
                    return tried[-1]
    raise InputMissing(
        "GSM8K train split not found: the zero_shot_cot folder ships only GSM8K's test file. Set "
        "data.gsm8k_train to grade_school_math/data/train.jsonl (openai/grade-school-math); looked in: "
        + ", ".join(str(p) for p in tried)
    )


def load_gsm8k(source, data_cfg=None) -> list[dict]:
    test = _gsm8k_rows(raw_path("gsm8k", source))
    train = _gsm8k_rows(find_gsm8k_train(source, data_cfg))
    if (len(train), len(test)) != GSM8K_SIZES:
        raise InputFileError(f"GSM8K: expected {GSM8K_SIZES[0]} train + {GSM8K_SIZES[1]} test questions, got {len(train)} + {len(test)}")
    return _numbered(train + test)


# --------------------------------------------------------------------------- multiple choice


def _choice_rows(path: Path, parse: Callable[[dict, str], tuple[str, list[str], int]]) -> list[dict]:
    """A JSONL file of multiple-choice questions, verbalised as the paper does; `parse(row, where)` gives
    (question, choices, index of the correct one) and names `where` (file:line) in its errors."""
    rows = []
    for lineno, s in _iter_jsonl(path):
        question, choices, index = parse(s, f"{path}:{lineno}")
        question, answer = verbalize_choices(question, choices, index)
        rows.append({"question": question, "answer": answer})
    return rows


def _parse_aqua(s: dict, where: str) -> tuple[str, list[str], int]:
    choices = []
    for opt in _field(s, "options", where):
        if len(opt) < 2 or opt[0] not in "ABCDE" or opt[1] != ")":
            raise InputFileError(f"{where}: option {opt!r} is not of the form 'X)...'")
        choices.append(opt[2:])
    return _field(s, "question", where).strip(), choices, _letter_index(s, "correct", len(choices), where)


def _letter_index(row: dict, name: str, n_choices: int, where: str) -> int:
    """The index of the answer letter in field `name` (A = 0), checked against the number of choices."""
    letter = _field(row, name, where)
    if not (isinstance(letter, str) and len(letter) == 1 and 0 <= ord(letter) - ord("A") < n_choices):
        raise InputFileError(f"{where}: {name} {letter!r} is not one of the {n_choices} choices")
    return ord(letter) - ord("A")


def load_aqua(source, data_cfg=None) -> list[dict]:
    """AQuA test (sample_index 97467..97720); train too (0..97466) when its train.json is present."""
    path = raw_path("aqua", source)
    folder = path if path.is_dir() else path.parent
    test_path = path if path.is_file() else folder / "test.json"
    if not test_path.is_file():
        raise InputMissing(f"AQuA: {test_path} not found")
    test = _choice_rows(test_path, _parse_aqua)
    train_path = folder / "train.json"
    if path.is_dir() and train_path.is_file():
        train = _choice_rows(train_path, _parse_aqua)
        return _numbered(train + test)
    # Only the test file is available: keep the paper's sample indices (test follows the 97,467 train rows).
    return _numbered(test, start=AQUA_TRAIN_SIZE)


def split_aqua(records: list[dict], data_cfg=None) -> dict[str, list[int]]:
    split = aqua_split()
    present = {r["sample_index"] for r in records}
    return {name: [i for i in idx if i in present] for name, idx in split.items()}


def _parse_commonsense(s: dict, where: str) -> tuple[str, list[str], int]:
    q = _field(s, "question", where)
    choices = [c["text"] for c in _field(q, "choices", where)]
    return _field(q, "stem", where).strip(), choices, _letter_index(s, "answerKey", len(choices), where)


def load_commonsense_qa(source, data_cfg=None) -> list[dict]:
    path = raw_path("commonsense_qa", source)
    folder = path if path.is_dir() else path.parent
    # The official test set has no answers: the paper uses dev as its test split.
    train = _choice_rows(folder / "train_rand_split.jsonl", _parse_commonsense)
    test = _choice_rows(folder / "dev_rand_split.jsonl", _parse_commonsense)
    if (len(train), len(test)) != COMMONSENSE_QA_SIZES:
        raise InputFileError(f"CommonsenseQA: expected {COMMONSENSE_QA_SIZES} train/dev questions, got {(len(train), len(test))}")
    return _numbered(train + test)


def _bigbench_examples(path: Path, expected_name: str) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, dict) or "examples" not in data:
        raise InputFileError(f"{path}: expected a BigBench task.json with 'examples'")
    if data.get("name") != expected_name:
        raise InputFileError(f"{path}: expected the BigBench task {expected_name!r}, found {data.get('name')!r}")
    return data["examples"]


def _bigbench_choice(path: Path, name: str, shuffle: bool) -> list[dict]:
    """BigBench multiple choice, as the paper: trailing '.' of a choice dropped, optional seed-0 shuffle."""
    state = np.random.RandomState(0) if shuffle else None
    rows = []
    for i, ex in enumerate(_bigbench_examples(path, name)):
        where = f"{path}: example {i}"
        scores = _field(ex, "target_scores", where)
        order = state.permutation(len(scores)) if state is not None else range(len(scores))
        choices: list[str] = [""] * len(scores)
        answer_index = None
        for j, (choice, correct) in enumerate(scores.items()):
            slot = int(order[j])
            choices[slot] = choice[:-1] if choice.endswith(".") else choice
            if correct:
                answer_index = slot
        if answer_index is None:
            raise InputFileError(f"{where}: no choice has a target score of 1")
        # Deliberately no strip() at the end of the input: the authors' dataset files keep e.g.
        # "Alice has the \nWhich choice is true?" (Shuffled objects inputs end with a space).
        question = _field(ex, "input", where).lstrip() + "\nWhich choice is true?"
        rows.append(dict(zip(("question", "answer"), verbalize_choices(question, choices, answer_index))))
    return rows


def load_date_understanding(source, data_cfg=None) -> list[dict]:
    return _numbered(_bigbench_choice(raw_path("date_understanding", source), "date_understanding", shuffle=True))


def load_tracking_shuffled_objects(source, data_cfg=None) -> list[dict]:
    return _numbered(_bigbench_choice(raw_path("tracking_shuffled_objects", source), "three_objects", shuffle=False))


# --------------------------------------------------------------------------- yes/no, letters


def load_strategy_qa(source, data_cfg=None) -> list[dict]:
    path = raw_path("strategy_qa", source)
    rows = []
    for i, ex in enumerate(_bigbench_examples(path, "strategyqa")):
        where = f"{path}: example {i}"
        scores = _field(ex, "target_scores", where)
        if scores.get("Yes") == 1:
            answer = "Yes"
        elif scores.get("No") == 1:
            answer = "No"
        else:
            raise InputFileError(f"{where}: target_scores has neither Yes nor No at 1: {scores}")
        rows.append({"question": _field(ex, "input", where).strip(), "answer": answer})
    return _numbered(rows)


def _examples_file(key: str) -> Callable:
    def load(source, data_cfg=None) -> list[dict]:
        path = raw_path(key, source)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise InputFileError(f"{path}: expected {{'examples': [{{question, answer}}...]}}")
        rows = []
        for i, ex in enumerate(data["examples"]):
            where = f"{path}: example {i}"
            rows.append({"question": _field(ex, "question", where), "answer": _field(ex, "answer", where)})
        return _numbered(rows)

    load.__name__ = f"load_{key}"
    return load


def split_gsm8k(records, data_cfg=None):
    return ordered_split(*GSM8K_SIZES)


def split_commonsense_qa(records, data_cfg=None):
    return ordered_split(*COMMONSENSE_QA_SIZES)


def _raw_files(key: str) -> Callable:
    def files(source, data_cfg=None) -> list[Path]:
        found = [raw_path(key, source)]
        if key == "gsm8k":
            found.append(find_gsm8k_train(source, data_cfg))
        return found

    return files


# --------------------------------------------------------------------------- registry

PAPER_TASKS = [
    Task("single_eq", "number_float", load=load_single_eq),
    Task("addsub", "number_float", load=load_addsub),
    Task("multiarith", "number_exact", load=load_multiarith),
    Task("gsm8k", "number_exact", load=load_gsm8k, split=split_gsm8k),
    Task("aqua", "choice", choices="ABCDE", load=load_aqua, split=split_aqua,
         note="AQuA: test split only (254 questions): its train.json (97,467) is not beside test.json in data.source"),
    Task("svamp", "number_float", load=load_svamp),
    Task("date_understanding", "choice", choices="ABCDEF", load=load_date_understanding),
    Task("tracking_shuffled_objects", "choice", choices="ABC", load=load_tracking_shuffled_objects),
    Task("last_letter_concatenation", "letters", load=_examples_file("last_letter_concatenation")),
    Task("coin_flip", "yesno", load=_examples_file("coin_flip")),
    Task("commonsense_qa", "choice", choices="ABCDE", load=load_commonsense_qa, split=split_commonsense_qa),
    Task("strategy_qa", "yesno", load=load_strategy_qa),
]
PAPER_KEYS = [t.name for t in PAPER_TASKS]

for _task in PAPER_TASKS:
    register(dataclasses.replace(_task, source_files=_raw_files(_task.name)))
