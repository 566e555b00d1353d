"""Data stage: a benchmark, a synthetic task or your own file -> problems.jsonl + split.json.

    ftcot data --dataset multiarith --source ../shared/datasets/zero_shot_cot/dataset --out runs/data

Everything is read and checked before anything is written, so a malformed source leaves no
output behind; manifest.json is written last, and a re-run with a finished output does no work.
No Ray here: loading a benchmark takes well under a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts import begin, finish, is_complete, read_manifest, stage_dir, stage_key, write_json
from ..cli import add_config_arguments, config_from_args, print_summary
from ..config import Config, with_overrides
from ..io import write_jsonl
from ..tasks.base import Task
from ..tasks.custom import resolve_task
from ..tasks.splits import paper_split

STAGE = "data"
INPUT_COLUMNS: dict[str, list[str]] = {}
OUTPUT_COLUMNS = {
    "problems": ["sample_index", "question", "answer", "split", "dataset"],
    "split": ["train", "test"],
}


def load_records(task: Task, cfg: Config) -> list[dict]:
    if task.load is None:
        raise ValueError(f"dataset {task.name!r} has no loader")
    source = None if task.synthetic else cfg.data.source
    return task.load(source, cfg.data)


def make_split(task: Task, records: list[dict], cfg: Config) -> dict[str, list[int]]:
    """The task's own split, else the paper's 70/30 seed-0 split over sample indices 0..n-1."""
    if task.split is not None:
        return task.split(records, cfg.data)
    return paper_split(len(records))


def check_split(records: list[dict], split: dict[str, list[int]], name: str) -> None:
    indices = [r["sample_index"] for r in records]
    if len(set(indices)) != len(indices):
        raise ValueError(f"dataset {name!r}: duplicate sample_index in the loaded records")
    train, test = set(split.get("train", [])), set(split.get("test", []))
    if train & test:
        raise ValueError(f"dataset {name!r}: {len(train & test)} sample indices are in both train and test")
    unknown = (train | test) - set(indices)
    if unknown:
        raise ValueError(f"dataset {name!r}: split names sample indices with no record, e.g. {sorted(unknown)[:5]}")


def problem_rows(records: list[dict], split: dict[str, list[int]], dataset: str) -> list[dict]:
    """One row per record in the split, sorted by sample_index (records outside it, e.g. AQuA's
    unused train questions, are left out)."""
    split_of = {i: name for name in ("train", "test") for i in split.get(name, [])}
    rows = []
    for rec in sorted(records, key=lambda r: r["sample_index"]):
        if rec["sample_index"] not in split_of:
            continue
        extra = {k: v for k, v in rec.items() if k not in OUTPUT_COLUMNS["problems"]}
        rows.append({
            "sample_index": rec["sample_index"],
            "question": rec["question"],
            "answer": str(rec["answer"]),
            "split": split_of[rec["sample_index"]],
            "dataset": dataset,
            **extra,
        })
    return rows


def build(cfg: Config) -> tuple[list[dict], dict[str, list[int]], list[str]]:
    """(problem rows, split, notes) for the configured dataset; all checks, no writes."""
    task = resolve_task(cfg.data)
    records = load_records(task, cfg)
    split = {k: sorted(v) for k, v in make_split(task, records, cfg).items()}
    check_split(records, split, task.name)
    rows = problem_rows(records, split, cfg.data.dataset)
    notes = []
    if not split.get("train"):
        notes.append(task.note or f"{task.name}: no train split")
    left_out = len(records) - len(rows)
    if left_out:
        notes.append(f"{left_out} loaded records are in neither split and were not written")
    return rows, split, notes


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    out = Path(out) if out else stage_dir(cfg, STAGE)
    if is_complete(out):
        return read_manifest(out)["summary"] | {"reused": True}
    rows, split, notes = build(cfg)  # before begin(): a bad source leaves nothing behind
    begin(out)
    write_jsonl(out / "problems.jsonl", rows)
    write_json(out / "split.json", {"train": split.get("train", []), "test": split.get("test", [])})
    summary = {
        "stage": STAGE,
        "dataset": cfg.data.dataset,
        "n": len(rows),
        "counts": {"train": len(split.get("train", [])), "test": len(split.get("test", []))},
        "notes": notes,
        "out": str(out),
    }
    finish(out, cfg, STAGE, outputs=OUTPUT_COLUMNS, summary=summary, key=stage_key(cfg, STAGE))
    return summary


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dataset", help="a paper benchmark (e.g. multiarith), a synthetic task, or a name for your own file")
    parser.add_argument("--source", help="raw benchmark folder (zero_shot_cot/dataset), one raw file, or your JSONL/CSV")
    parser.add_argument("--out", help="exact output folder (default: <run_dir>/data/<key>)")
    parser.add_argument("--in", dest="inp", help=argparse.SUPPRESS)  # stage contract; data has no input stage


def main(args) -> int:
    cfg = config_from_args(args)
    # Set as raw values, not YAML-parsed override strings, so a name like "yes" or a path stays a string.
    flags = {"data.dataset": args.dataset, "data.source": args.source}
    cfg = with_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    print_summary(run(cfg, args.out, args.inp))
    return 0
