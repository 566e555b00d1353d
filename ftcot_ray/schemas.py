"""The tables the stages hand each other, their columns, and a read/write pair that checks them.

A stage declares which tables it reads and writes (by name, below); `read_table` refuses a file
missing a column (naming the file, the line and the column) and `write_table` refuses to write a
row without one, so a contract is enforced where data crosses a stage boundary, not only written
into a manifest. Extra columns are carried through (a stage may add its own).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import InputFileError, InputMissing
from .io import iter_jsonl, write_jsonl


@dataclass(frozen=True)
class Table:
    name: str
    file: str
    columns: tuple[str, ...]  # required in every row


PROBLEM_COLUMNS = ("sample_index", "question", "answer", "split", "dataset")
COMPLETION_COLUMNS = (
    "sample_index", "sample_idx", "split", "question", "answer", "reasoning_prompt", "rationale", "answer_prompt",
    "answer_completion", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "model", "temperature",
    "error", "attempts",
)
CURATED_COLUMNS = COMPLETION_COLUMNS + ("prediction", "correct", "kept", "reject_reason")
PAIR_COLUMNS = ("sample_index", "sample_idx", "split", "prompt", "completion")
PREDICTION_COLUMNS = ("sample_index", "question", "answer", "output", "prediction", "correct", "well_formed",
                      "output_tokens", "error")

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("problems", "problems.jsonl", PROBLEM_COLUMNS),
    Table("completions", "completions.jsonl", COMPLETION_COLUMNS),
    Table("curated", "curated.jsonl", CURATED_COLUMNS),
    Table("ft_cot_pairs", "ft_cot_pairs.jsonl", PAIR_COLUMNS),
    Table("vanilla_pairs", "vanilla_pairs.jsonl", PAIR_COLUMNS),
    Table("step_by_step_pairs", "step_by_step_pairs.jsonl", PAIR_COLUMNS + ("task",)),
    Table("predictions", "predictions.jsonl", PREDICTION_COLUMNS),
)}


def table(name: str) -> Table:
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name]


def table_path(folder_or_file: Path | str, name: str) -> Path:
    """`folder/<table file>`, or the path itself when it already names a file."""
    p = Path(folder_or_file)
    return p if p.suffix == ".jsonl" else p / table(name).file


def read_table(folder_or_file: Path | str, name: str, columns: Iterable[str] | None = None) -> list[dict]:
    """Every row of a table; the error names the file, the line and the missing column(s)."""
    path = table_path(folder_or_file, name)
    if not path.is_file():
        raise InputMissing(f"{path}: no {name} table here")
    need = tuple(columns) if columns is not None else table(name).columns
    rows = []
    for lineno, row in iter_jsonl(path, with_lines=True):
        missing = [c for c in need if c not in row]
        if missing:
            raise InputFileError(f"{path}:{lineno}: {name} row lacks column(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def check_rows(rows: list[dict], name: str, where: str) -> None:
    need = table(name).columns
    for i, row in enumerate(rows, 1):
        missing = [c for c in need if c not in row]
        if missing:
            raise ValueError(f"{where}: row {i} of the {name} table lacks column(s) {', '.join(missing)} "
                             "(a bug: the stage must write every declared column)")


def write_table(folder: Path | str, name: str, rows: list[dict]) -> dict:
    """Write a checked table atomically; returns its manifest entry (file, columns, rows, sha256)."""
    path = Path(folder) / table(name).file
    check_rows(rows, name, str(path))
    n = write_jsonl(path, rows)
    return {"file": path.name, "columns": list(table(name).columns), "rows": n, "sha256": file_sha256(path)}


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
