"""Data stage: a benchmark, a synthetic task or your own data -> the problems table + split.json.

    ftcot data --dataset multiarith --source ../shared/datasets/zero_shot_cot/dataset --out runs/data
    ftcot data --dataset my_task --source s3://bucket/questions/ data.answer_format=number_exact

Reads: the raw source (data.source). Writes: the `problems` table, split.json. Everything is read
and checked before anything is written, so a malformed source leaves no output behind. The key
covers the source's content, so an edited file is read again.

Where it runs: the paper's benchmarks and the synthetic tasks are built on the driver (well under a
second; a JSONL table). Your own data is a Ray Data pipeline (Parquet shards), never loaded whole by
the driver, which holds two 8-byte hashes a record to find repeated questions:

    files (ftcot_ray/readers.py, each record checked) -> held in the object store
      -> the hashes (question, answer) and file positions -> repeats merged, conflicts dropped
      -> numbered in file order, split (the file's column, or the paper's 70/30) -> problems shards
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import open_stage
from ..config import Config
from ..errors import DataError, FtcotError, InputFileError
from ..schemas import PROBLEM_COLUMNS
from ..tasks.base import Task
from ..tasks.custom import is_custom, resolve_task
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
    """(problem rows, split, notes) for a registered dataset (a paper benchmark, a synthetic task);
    all checks, no writes."""
    task = resolve_task(cfg.data)
    records = load_records(task, cfg)
    notes = []
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
    if is_custom(cfg.data):
        return run_custom(cfg, st)
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


# --------------------------------------------------------------------------- your own data, on Ray Data


def run_custom(cfg: Config, st) -> dict:
    """Your own records -> problems shards (see the module docstring)."""
    import numpy as np
    import ray

    from ..dataplane import collect_rows, map_rows, ordered, user_errors
    from ..ray_utils import init_ray
    from ..tables import iter_table, write_dataset
    from ..tasks.custom import custom_task, read_records

    custom_task(cfg.data)  # says which data.answer_format is missing before anything is read
    init_ray(cfg)
    source = str(cfg.data.source)
    with user_errors():
        records = ordered(read_records(cfg.data)).materialize()  # read and checked, all of it, before any write
        parts = collect_rows(records, record_counts, batch_size=65536)
        n, with_split = sum(p["n"] for p in parts), sum(p["with_split"] for p in parts)
        if not n:
            raise InputFileError(f"{source}: no records")
        if 0 < with_split < n:
            raise InputFileError(f"{source}: {with_split} of {n} records have a 'split'; give it on all or none")
        order, qh, ah = record_keys(records, parts)
        dropped, merged, conflicting = repeats(order, qh, ah)
        kept = n - len(dropped)
        if not kept:
            raise DataError(f"{source}: no records left after dropping conflicting duplicates")
        train = None if with_split else np.zeros(kept, dtype=bool)
        if train is not None:
            train[paper_split(kept)["train"]] = True
        offsets = file_offsets(parts)
        problems = map_rows(records, number_records, offsets=ray.put(offsets), dropped=ray.put(dropped),
                            train=ray.put(train) if train is not None else None, dataset=cfg.data.dataset)
        st.tables["problems"] = write_dataset(problems, st.target(), "problems", expected_rows=kept)
    split: dict[str, list[int]] = {"train": [], "test": []}
    for batch in iter_table(st.target(), "problems", ("sample_index", "split")):
        for r in batch:
            split[r["split"]].append(int(r["sample_index"]))
    st.write_json("split.json", {k: sorted(v) for k, v in split.items()})
    notes = [f"{merged} repeated questions merged into their first record; {conflicting} records dropped: the "
             "same question with different answers"] if merged or conflicting else []
    if not split["train"]:
        notes.append(f"{cfg.data.dataset}: no train split")
    summary = {"stage": STAGE, "dataset": cfg.data.dataset, "n": kept,
               "counts": {"train": len(split["train"]), "test": len(split["test"])}, "notes": notes,
               "records": n, "files": len(offsets), "out": str(st.out)}
    return st.finish(summary, OUTPUTS)


def record_counts(rows: list[dict]) -> dict:
    """Per batch: records, records with a split, and records per file (`_file` -> count)."""
    files: dict[int, int] = {}
    for r in rows:
        files[r["_file"]] = files.get(r["_file"], 0) + 1
    return {"n": len(rows), "with_split": sum(r["split"] is not None for r in rows), "files": files}


def file_offsets(parts: list[dict]):
    """Each file's first record's place in file order (files by their sorted index)."""
    import numpy as np

    counts: dict[int, int] = {}
    for p in parts:
        for f, c in p["files"].items():
            counts[int(f)] = counts.get(int(f), 0) + c
    sizes = np.zeros(max(counts) + 1 if counts else 0, dtype=np.int64)
    for f, c in counts.items():
        sizes[f] = c
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes


def record_keys(records, parts):
    """(file-order position, question hash, answer hash) of every record: three int64 columns."""
    import numpy as np

    offsets = file_offsets(parts)
    order, qh, ah = [], [], []
    for b in records.select_columns(["_file", "_row", "_qh", "_ah"]).iter_batches(batch_size=65536,
                                                                                  batch_format="numpy"):
        order.append(offsets[b["_file"]] + b["_row"])
        qh.append(b["_qh"])
        ah.append(b["_ah"])
    return np.concatenate(order), np.concatenate(qh), np.concatenate(ah)


def repeats(order, qh, ah):
    """Repeated questions: the same answer merged into the first record (file order); different answers
    dropped altogether (which one is right cannot be told). Returns (dropped positions, sorted; merged
    count; conflicting count)."""
    import numpy as np

    by = np.lexsort((order, qh))  # by question, then file order
    q, a, o = qh[by], ah[by], order[by]
    first = np.r_[True, q[1:] != q[:-1]]  # the first record of each question
    group = np.cumsum(first) - 1
    a_min = np.minimum.reduceat(a, np.flatnonzero(first))
    a_max = np.maximum.reduceat(a, np.flatnonzero(first))
    conflict = (a_min != a_max)[group]
    dropped = np.sort(np.concatenate([o[conflict], o[~conflict & ~first]]))
    return dropped, int((~conflict & ~first).sum()), int(conflict.sum())


def number_records(rows: list[dict], offsets, dropped, train, dataset: str) -> list[dict]:
    """The kept records of a batch as problem rows: sample_index = file-order position minus the
    dropped records before it; the split from the record, else the paper's split (`train` mask)."""
    import numpy as np

    out = []
    for r in rows:
        pos = int(offsets[r["_file"]] + r["_row"])
        before = int(np.searchsorted(dropped, pos))
        if before < len(dropped) and dropped[before] == pos:
            continue
        i = pos - before
        split = r["split"] or ("train" if train[i] else "test")
        out.append({"sample_index": i, "question": r["question"], "answer": r["answer"], "split": split,
                    "dataset": dataset})
    return out
