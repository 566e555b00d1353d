"""Tables as JSONL: small, human-readable, read by Ray Data (`read_json`) and pandas alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputFileError

__all__ = ["InputFileError", "iter_jsonl", "read_jsonl", "write_jsonl", "read_json", "read_text_lines"]


def read_text_lines(path: Path | str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a byte that is not UTF-8 is an error naming its line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputFileError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                     "save the file as UTF-8") from None


def iter_jsonl(path: Path | str, with_lines: bool = False) -> Iterator:
    """Each JSON object of a JSONL file (with `with_lines`: (line number, object)); blank lines skipped."""
    path = Path(path)
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield (lineno, row) if with_lines else row


def read_jsonl(path: Path | str) -> list[dict]:
    return list(iter_jsonl(path))


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> int:
    """Write atomically (temp file + rename) so a killed writer never leaves a half table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_default) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputFileError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
