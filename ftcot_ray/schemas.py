"""The tables the stages hand each other: their columns, the columns' types, and how they are ordered.

Declarations only; reading and writing (JSONL files and Parquet shard folders, on the driver or as
Ray Datasets) is `tables.py`. A reader refuses a table missing a column (naming the file and, for
JSONL, the line); a writer refuses rows without one, so a contract is enforced where data crosses a
stage boundary, not only written into a manifest. Extra columns are carried through (a stage may
add its own). Every Parquet shard of a table is cast to the declared types before it is written, so
the shards of one table always share one schema (a block whose `error` column is all null would
otherwise be typed `null` and disagree with its neighbours).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

I64, F64, STR, BOOL = "int64", "float64", "string", "bool"


@dataclass(frozen=True)
class Table:
    name: str
    types: tuple[tuple[str, str], ...]  # (column, arrow type) of the columns required in every row
    key: tuple[str, ...]  # the order a reader sorts by (unique per row)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.types)

    @property
    def file(self) -> str:
        """The JSONL form's file name; the Parquet form is a folder named `name`."""
        return f"{self.name}.jsonl"

    def arrow_schema(self):
        import pyarrow as pa

        return pa.schema([(c, arrow_type(t)) for c, t in self.types])


def arrow_type(name: str):
    """The pyarrow type of a declared column type (pyarrow is imported only when a table is read or written)."""
    import pyarrow as pa

    return {I64: pa.int64, F64: pa.float64, STR: pa.string, BOOL: pa.bool_}[name]()

PROBLEM_TYPES = (("sample_index", I64), ("question", STR), ("answer", STR), ("split", STR), ("dataset", STR))
COMPLETION_TYPES = (
    ("sample_index", I64), ("sample_idx", I64), ("split", STR), ("question", STR), ("answer", STR),
    ("reasoning_prompt", STR), ("rationale", STR), ("answer_prompt", STR), ("answer_completion", STR),
    ("finish_reason", STR), ("prompt_tokens", I64), ("completion_tokens", I64), ("cost_usd", F64), ("model", STR),
    ("temperature", F64), ("error", STR), ("attempts", I64),
)
CURATED_TYPES = COMPLETION_TYPES + (("prediction", STR), ("correct", BOOL), ("kept", BOOL), ("reject_reason", STR))
PAIR_TYPES = (("sample_index", I64), ("sample_idx", I64), ("split", STR), ("prompt", STR), ("completion", STR))
PREDICTION_TYPES = (("sample_index", I64), ("question", STR), ("answer", STR), ("output", STR), ("prediction", STR),
                    ("correct", BOOL), ("well_formed", BOOL), ("output_tokens", I64), ("error", STR))

PROBLEM_COLUMNS = tuple(c for c, _ in PROBLEM_TYPES)
COMPLETION_COLUMNS = tuple(c for c, _ in COMPLETION_TYPES)
CURATED_COLUMNS = tuple(c for c, _ in CURATED_TYPES)
PAIR_COLUMNS = tuple(c for c, _ in PAIR_TYPES)
PREDICTION_COLUMNS = tuple(c for c, _ in PREDICTION_TYPES)
ROW_KEY = ("sample_index", "sample_idx")

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("problems", PROBLEM_TYPES, ("sample_index",)),
    Table("completions", COMPLETION_TYPES, ROW_KEY),
    Table("curated", CURATED_TYPES, ROW_KEY),
    Table("ft_cot_pairs", PAIR_TYPES, ROW_KEY),
    Table("vanilla_pairs", PAIR_TYPES, ROW_KEY),
    Table("step_by_step_pairs", PAIR_TYPES + (("task", STR),), ROW_KEY + ("task",)),
    Table("predictions", PREDICTION_TYPES, ("sample_index",)),
)}


def table(name: str) -> Table:
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name]


def check_rows(rows: list[dict], name: str, where: str) -> None:
    need = table(name).columns
    for i, row in enumerate(rows, 1):
        missing = [c for c in need if c not in row]
        if missing:
            raise ValueError(f"{where}: row {i} of the {name} table lacks column(s) {', '.join(missing)} "
                             "(a bug: the stage must write every declared column)")


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
