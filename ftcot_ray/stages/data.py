"""Data stage: a benchmark, a synthetic task or your own file -> problems.jsonl + split.json.

    ftcot data --dataset multiarith --source ../shared/datasets/zero_shot_cot/dataset --out runs/data

Reads: the raw source (data.source). Writes: the `problems` table, split.json.
Everything is read and checked before anything is written, so a malformed source leaves no
output behind. The key covers the source file's content, so an edited file is read again.
Runs on the driver: loading a benchmark takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import open_stage
from ..config import Config
from ..errors import DataError, FtcotError, InputFileError
from ..schemas import PROBLEM_COLUMNS
from ..tasks.base import Task
from ..tasks.custom import dedup_records, is_custom, resolve_task
from ..tasks.splits import paper_split

STAGE = "data"
OUTPUTS = ("problems",)


def load_records(task: Task, cfg: Config) -> list[dict]:
    if task.load is None:
        raise DataError(f"dataset {task.name!r} has no loader")
    source = None if task.synthetic else cfg.data.source
    try:
        return task.load(source, cfg.data)
    except FtcotError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # A raw file of another benchmark, or of another shape: say which file, not only what broke.
        raise InputFileError(f"{source}: cannot be read as the raw {task.name} file "
                             f"({type(e).__name__}: {e}); is data.source the right file for data.dataset={task.name}?") from None


def make_split(task: Task, records: list[dict], cfg: Config) -> dict[str, list[int]]:
    """The task's own split, else the paper's 70/30 seed-0 split over sample indices 0..n-1."""
    if task.split is not None:
        return task.split(records, cfg.data)
    return paper_split(len(records))


def check_split(records: list[dict], split: dict[str, list[int]], name: str) -> None:
    indices = [r["sample_index"] for r in records]
    if len(set(indices)) != len(indices):
        raise DataError(f"dataset {name!r}: duplicate sample_index in the loaded records")
    train, test = set(split.get("train", [])), set(split.get("test", []))
    if train & test:
        raise DataError(f"dataset {name!r}: {len(train & test)} sample indices are in both train and test")
    unknown = (train | test) - set(indices)
    if unknown:
        raise DataError(f"dataset {name!r}: split names sample indices with no record, e.g. {sorted(unknown)[:5]}")


def problem_rows(records: list[dict], split: dict[str, list[int]], dataset: str) -> list[dict]:
    """One row per record in the split, sorted by sample_index (records outside it, e.g. AQuA's
    unused train questions, are left out)."""
    split_of = {i: name for name in ("train", "test") for i in split.get(name, [])}
    rows = []
    for rec in sorted(records, key=lambda r: r["sample_index"]):
        if rec["sample_index"] not in split_of:
            continue
        extra = {k: v for k, v in rec.items() if k not in PROBLEM_COLUMNS}
        rows.append({"sample_index": rec["sample_index"], "question": rec["question"], "answer": str(rec["answer"]),
                     "split": split_of[rec["sample_index"]], "dataset": dataset, **extra})
    return rows


def cross_split_repeats(rows: list[dict]) -> int:
    """Test questions whose text also stands in train (the paper's own splits have a few)."""
    train = {" ".join(r["question"].split()).lower() for r in rows if r["split"] == "train"}
    return sum(" ".join(r["question"].split()).lower() in train for r in rows if r["split"] == "test")


def build(cfg: Config) -> tuple[list[dict], dict[str, list[int]], list[str]]:
    """(problem rows, split, notes) for the configured dataset; all checks, no writes."""
    task = resolve_task(cfg.data)
    records = load_records(task, cfg)
    notes = []
    if is_custom(cfg.data):
        # Your own file: repeated questions are merged before the split (the paper's benchmarks keep
        # the paper's splits exactly, so they are only counted, below).
        records, dups = dedup_records(records)
        if dups["merged"] or dups["conflicting"]:
            notes.append(f"{dups['merged']} repeated questions merged into their first record; "
                         f"{dups['conflicting']} records dropped: the same question with different answers")
        if not records:
            raise DataError(f"{cfg.data.source}: no records left after dropping conflicting duplicates")
    split = {k: sorted(v) for k, v in make_split(task, records, cfg).items()}
    check_split(records, split, task.name)
    rows = problem_rows(records, split, cfg.data.dataset)
    if not split.get("train"):
        notes.append(task.note or f"{task.name}: no train split")
    left_out = len(records) - len(rows)
    if left_out:
        notes.append(f"{left_out} loaded records are in neither split and were not written")
    repeats = cross_split_repeats(rows)
    if repeats:
        notes.append(f"{repeats} test questions also appear in train (kept: the split is the paper's)")
    return rows, split, notes


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    st = open_stage(cfg, STAGE, out, needs=None)
    if st.reused:
        return st.summary
    rows, split, notes = build(cfg)
    st.write("problems", rows)
    st.write_json("split.json", {"train": split.get("train", []), "test": split.get("test", [])})
    summary = {
        "stage": STAGE,
        "dataset": cfg.data.dataset,
        "n": len(rows),
        "counts": {"train": len(split.get("train", [])), "test": len(split.get("test", []))},
        "notes": notes,
        "out": str(st.out),
    }
    return st.finish(summary, OUTPUTS)
