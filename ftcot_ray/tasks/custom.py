"""Your own task: a JSONL, CSV or JSON file of question/answer records.

    ftcot data --dataset my_task --source my_task.jsonl data.answer_format=number_exact

Each record needs ``question`` and ``answer``; an optional ``split`` column ("train" / "test") on
every record fixes the split, otherwise the paper's 70/30 seed-0 split is used. How answers are read
and graded comes from ``data.answer_format`` (and ``data.choices`` for multiple choice).
Records are numbered in file order (``sample_index`` 0..n-1).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError, InputMissing
from ..io import InputFileError, iter_jsonl, read_json, read_text_lines
from . import get_task, task_names
from .answers import NUMBER_RE
from .base import Task
from .splits import paper_split, split_from_column

CUSTOM_NAME = "custom"
ANSWER_FORMATS = ("number_float", "number_exact", "choice", "yesno", "letters")


def _rows_with_location(path: Path) -> list[tuple[str, dict]]:
    """(location, row) for every record: `file:line` for JSONL/CSV, `file: record i` for JSON."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path, with_lines=True)]
    if suffix == ".csv":
        for _ in read_text_lines(path):  # names the line of a byte that is not UTF-8
            pass
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise InputFileError(f"{path}:1: empty CSV file (expected a header with question,answer)")
            return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    if suffix == ".json":
        data = read_json(path)
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise InputFileError(f"{path}: expected a JSON list of records or {{'data': [...]}}")
        return [(f"{path}: record {i}", row) for i, row in enumerate(rows)]
    raise InputFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .json")


def _check_answer(answer: str, fmt: str, choices: str, where: str) -> str:
    if fmt in ("number_float", "number_exact"):
        if not NUMBER_RE.fullmatch(answer.replace(",", "")):
            raise InputFileError(f"{where}: answer {answer!r} is not a number (data.answer_format={fmt})")
    elif fmt == "yesno":
        if answer.lower() not in ("yes", "no"):
            raise InputFileError(f"{where}: answer {answer!r} is not yes/no (data.answer_format=yesno)")
    elif fmt == "choice":
        if len(answer) != 1 or answer not in choices:
            raise InputFileError(f"{where}: answer {answer!r} is not one of the letters {choices!r} (data.choices)")
    return answer


def load_custom(source, data_cfg) -> list[dict]:
    if source is None:
        raise InputMissing("a custom dataset needs data.source: a JSONL/CSV/JSON file of {question, answer}")
    path = Path(source)
    if not path.is_file():
        raise InputMissing(f"data.source {path} is not a file")
    fmt = _answer_format(data_cfg)
    records = []
    for where, row in _rows_with_location(path):
        if not isinstance(row, dict):
            raise InputFileError(f"{where}: expected an object with question and answer, got {type(row).__name__}")
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise InputFileError(f"{where}: missing or empty 'question'")
        if answer is None or isinstance(answer, (dict, list)) or str(answer).strip() == "":
            raise InputFileError(f"{where}: missing or empty 'answer'")
        rec = {"sample_index": len(records), "question": question.strip(),
               "answer": _check_answer(str(answer).strip(), fmt, data_cfg.choices, where)}
        if row.get("split") not in (None, ""):
            if row["split"] not in ("train", "test"):
                raise InputFileError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
            rec["split"] = row["split"]
        records.append(rec)
    if not records:
        raise InputFileError(f"{path}: no records")
    with_split = sum("split" in r for r in records)
    if 0 < with_split < len(records):
        raise InputFileError(f"{path}: {with_split} of {len(records)} records have a 'split'; give it on all or none")
    return records


def split_custom(records: list[dict], data_cfg=None) -> dict[str, list[int]]:
    """The file's own `split` column, else the paper's 70/30 seed-0 split."""
    if records and "split" in records[0]:
        return split_from_column(records)
    return paper_split(len(records))


def dedup_records(records: list[dict]) -> tuple[list[dict], dict]:
    """Drop repeated questions before the split, so one question cannot be on both sides of it.

    The same question with the same answer is merged into its first record; the same question
    with different answers is dropped altogether (which answer is right cannot be told).
    Records are renumbered 0..n-1 in file order. Returns (records, {"merged", "conflicting"}).
    """
    answers: dict[str, set[str]] = {}
    for r in records:
        answers.setdefault(_normal(r["question"]), set()).add(_normal(r["answer"]))
    seen: set[str] = set()
    kept, merged, conflicting = [], 0, 0
    for r in records:
        q = _normal(r["question"])
        if len(answers[q]) > 1:
            conflicting += 1
            continue
        if q in seen:
            merged += 1
            continue
        seen.add(q)
        kept.append(r | {"sample_index": len(kept)})
    return kept, {"merged": merged, "conflicting": conflicting}


def _normal(text: str) -> str:
    return " ".join(str(text).split()).lower()


def _answer_format(data_cfg) -> str:
    fmt = getattr(data_cfg, "answer_format", None)
    if fmt not in ANSWER_FORMATS:
        raise ConfigError(
            f"dataset {data_cfg.dataset!r} is your own file, so set data.answer_format to one of "
            f"{', '.join(ANSWER_FORMATS)} (how answers are read and graded)"
        )
    return fmt


def custom_task(data_cfg) -> Task:
    return Task(
        name=data_cfg.dataset,
        kind=_answer_format(data_cfg),
        choices=data_cfg.choices if data_cfg.answer_format == "choice" else "",
        load=load_custom,
        split=split_custom,
        note=f"custom dataset from {data_cfg.source}",
    )


def is_custom(data_cfg) -> bool:
    if data_cfg.dataset == CUSTOM_NAME:
        return True
    if data_cfg.dataset in task_names():
        return False
    # An unregistered name is the user's own task when it says how to grade or points at a file.
    return data_cfg.answer_format is not None or (data_cfg.source is not None and Path(data_cfg.source).is_file())


def resolve_task(data_cfg) -> Task:
    """The Task for a config's data section: a registered task, or the user's own file.

    Stages that grade (curate, eval) should call this rather than `get_task(cfg.data.dataset)`,
    so custom datasets grade with their `data.answer_format`.
    """
    if is_custom(data_cfg):
        return custom_task(data_cfg)
    try:
        return get_task(data_cfg.dataset)
    except KeyError as e:
        raise ConfigError(f"data.dataset: {e.args[0]}; or, for your own data, a JSONL/CSV data.source file "
                          "with data.answer_format") from None


def source_files(data_cfg) -> list[Path]:
    """The file(s) a dataset is read from (their content goes into the data key)."""
    if not data_cfg.source:
        return []
    try:
        task = resolve_task(data_cfg)
    except ConfigError:
        return [Path(data_cfg.source)]
    if task.synthetic:
        return []
    if task.source_files is None:
        return [Path(data_cfg.source)]
    try:
        return task.source_files(data_cfg.source, data_cfg)
    except FileNotFoundError:  # the stage itself says what is missing, and where
        return [Path(data_cfg.source)]
