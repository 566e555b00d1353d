"""Your own task: question/answer records in JSONL, CSV, JSON, Parquet, a folder of such shards, or a
Hugging Face `datasets` folder written with `save_to_disk`; on local disk or object storage.

    ftcot data --dataset my_task --source my_task.jsonl data.answer_format=number_exact
    ftcot data --dataset my_task --source s3://bucket/questions/ data.answer_format=choice

Each record needs ``question`` and ``answer``; an optional ``split`` column ("train" / "test") on
every record fixes the split, otherwise the paper's 70/30 seed-0 split is used. How answers are read
and graded comes from ``data.answer_format`` (and ``data.choices`` for multiple choice). Records are
numbered in file order (files sorted by name; ``sample_index`` 0..n-1 after repeats are merged).

The files are read by Ray Data (ftcot_ray/readers.py), each record checked where it stands
(`check_record`): nothing is loaded whole on the driver. The data stage (stages/data.py) merges
repeated questions and numbers them from two small hash columns per record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from .. import storage
from ..errors import ConfigError, InputMissing
from ..io import InputFileError
from ..readers import file_format
from . import get_task, task_names
from .answers import NUMBER_RE
from .base import Task

CUSTOM_NAME = "custom"
ANSWER_FORMATS = ("number_float", "number_exact", "choice", "yesno", "letters")


# --------------------------------------------------------------------------- where the records are


def source_listing(source: str) -> list[tuple[str, int, int]]:
    """(path or URI, size, mtime_ns) of every record file of `source` (a file, or a folder searched
    recursively; a `datasets` folder's .arrow shards; names starting with . or _ skipped), sorted."""
    if storage.is_uri(source):
        import pyarrow.fs as pafs

        fs, root = storage.filesystem(source)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [(source, info.size, info.mtime_ns or 0)]
        if info.type == pafs.FileType.NotFound:
            raise InputMissing(f"data.source {source} does not exist")
        scheme = source.split("://", 1)[0]
        found = [(f"{scheme}://{i.path}", i.size, i.mtime_ns or 0)
                 for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.type == pafs.FileType.File and _is_record_file(i.path[len(root):])]
    else:
        path = Path(source)
        if path.is_file():
            return [(str(path), path.stat().st_size, path.stat().st_mtime_ns)]
        if not path.is_dir():
            raise InputMissing(f"data.source {path} is not a file or a folder")
        found = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
                 if p.is_file() and _is_record_file(str(p.relative_to(path)))]
    if not found:
        raise InputMissing(f"data.source {source}: no .jsonl, .csv, .json, .parquet or .arrow files in it")
    arrow = [f for f in found if file_format(f[0]) == "arrow"]
    if arrow and _has_dataset_dict(source):  # a DatasetDict: its train and test folders
        others = sorted({p[len(source.rstrip("/")):].strip("/").split("/")[0] for p, _, _ in arrow} - {"train", "test"})
        if others:
            raise InputFileError(f"data.source {source}: a datasets DatasetDict with split(s) {', '.join(others)} "
                                 "besides train and test: point data.source at one split's folder, or save the "
                                 "splits as train and test")
    return sorted(arrow or found)  # a `datasets` folder: its .arrow shards (its .json files are metadata)


def split_folders(source: str, paths: list[str]) -> list[Optional[str]]:
    """`train` or `test` for each file in that split folder of a `datasets` DatasetDict (saved with
    `save_to_disk`, so a `dataset_dict.json` stands beside the split folders); None otherwise."""
    if not _has_dataset_dict(source):
        return [None] * len(paths)
    rels = [p[len(source.rstrip("/")):].strip("/").split("/") for p in paths]
    return [r[0] if len(r) == 2 and r[0] in ("train", "test") else None for r in rels]


def _has_dataset_dict(source: str) -> bool:
    if storage.is_uri(source):
        return storage.read_bytes(storage.join(source, "dataset_dict.json")) is not None
    return (Path(source) / "dataset_dict.json").is_file()


def _is_record_file(rel: str) -> bool:
    parts = [p for p in rel.strip("/").split("/") if p]
    return bool(parts) and not any(p.startswith((".", "_")) for p in parts) and file_format(parts[-1]) is not None


# --------------------------------------------------------------------------- one record


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


def normal(text: str) -> str:
    """What makes two questions (or answers) the same: case and whitespace aside."""
    return " ".join(str(text).split()).lower()


def text_hash(text: str) -> int:
    """64 bits (as a signed int64) of a normalised text."""
    return int.from_bytes(hashlib.blake2b(normal(text).encode(), digest_size=8).digest(), "little", signed=True)


def check_record(row: object, where: str, fmt: str, choices: str, split_default: Optional[str] = None) -> dict:
    """One source record -> {question, answer, split, _qh, _ah}; an `InputFileError` naming `where` otherwise.
    `split_default`: the split of a `datasets` folder's split folder, for records that do not name one."""
    if not isinstance(row, dict):
        raise InputFileError(f"{where}: expected an object with question and answer, got {type(row).__name__}")
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise InputFileError(f"{where}: missing or empty 'question'")
    if answer is None or isinstance(answer, (dict, list)) or str(answer).strip() == "":
        raise InputFileError(f"{where}: missing or empty 'answer'")
    split = row.get("split")
    if split in ("", None):
        split = split_default
    elif split not in ("train", "test"):
        raise InputFileError(f"{where}: split must be 'train' or 'test', got {split!r}")
    answer = _check_answer(str(answer).strip(), fmt, choices, where)
    return {"question": question.strip(), "answer": answer, "split": split, "_qh": text_hash(question),
            "_ah": text_hash(answer)}


def record_schema():
    import pyarrow as pa

    return pa.schema([("question", pa.string()), ("answer", pa.string()), ("split", pa.string()),
                      ("_qh", pa.int64()), ("_ah", pa.int64())])


def read_records(data_cfg):
    """Every record of `data.source`, checked, as a Ray Dataset in file order (`_file`, `_row` say where
    each came from: the file's place in the sorted listing and its record number there)."""
    import ray.data

    from ..readers import record_source

    fmt, choices = _answer_format(data_cfg), data_cfg.choices
    listing = source_listing(str(data_cfg.source))
    files = [storage.filesystem(p)[1] if storage.is_uri(p) else p for p, _, _ in listing]
    filesystem = storage.filesystem(listing[0][0])[0] if storage.is_uri(listing[0][0]) else None
    splits = split_folders(str(data_cfg.source), [p for p, _, _ in listing])

    def convert(rec: dict, where: str, file: int) -> dict:
        return check_record(rec, where, fmt, choices, splits[file])

    return ray.data.read_datasource(record_source(files, [p for p, _, _ in listing], convert, record_schema(),
                                                  filesystem=filesystem))


# --------------------------------------------------------------------------- the task


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
        note=f"custom dataset from {data_cfg.source}",
    )


def _exists(source: str) -> bool:
    if storage.is_uri(source):
        return True  # checked when read: naming a URI says it is data
    return Path(source).exists()


def is_custom(data_cfg) -> bool:
    if data_cfg.dataset == CUSTOM_NAME:
        return True
    if data_cfg.dataset in task_names():
        return False
    # An unregistered name is the user's own task when it says how to grade or points at data.
    return data_cfg.answer_format is not None or (data_cfg.source is not None and _exists(str(data_cfg.source)))


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


def source_files(data_cfg) -> list[str]:
    """The file(s) a dataset is read from (their content goes into the data key)."""
    if not data_cfg.source:
        return []
    try:
        task = resolve_task(data_cfg)
    except ConfigError:
        return [str(data_cfg.source)]
    if task.synthetic:
        return []
    if is_custom(data_cfg):
        try:
            return [p for p, _, _ in source_listing(str(data_cfg.source))]
        except (InputMissing, OSError):  # the stage itself says what is missing, and where
            return [str(data_cfg.source)]
    if task.source_files is None:
        return [str(data_cfg.source)]
    try:
        return [str(p) for p in task.source_files(data_cfg.source, data_cfg)]
    except FileNotFoundError:
        return [str(data_cfg.source)]
