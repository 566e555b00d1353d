"""Record files as Ray Data blocks, each record checked where it stands: JSONL, CSV, JSON, Parquet, Arrow.

One Ray Data datasource (`RecordSource`) reads every record-file shape the project takes, streamed
file by file in Ray Data's read tasks (never whole on the driver), on local disk or object storage
(pyarrow filesystems: s3://, gs://):

* JSONL (`.jsonl`, `.ndjson`) and CSV line by line, so a bad record is named by `file:line`;
* JSON (`.json`): a list of records or `{"data": [...]}` (a JSON document cannot be streamed: it is
  read whole, in its read task);
* Parquet, and Arrow IPC streams (`.arrow`: the files of a Hugging Face `datasets` folder written
  with `save_to_disk`), batch by batch, a record named by `file: record N`.

Each record goes through `convert(record, where, file)`, a plain function that checks and shapes it
(or raises an `InputFileError` naming `where`); the block carries `_file` (the file's place in the sorted
listing) and `_row` (the record's number in its file, from 0), so file order survives any shuffle.
Why a datasource of our own and not `read_json` / `read_csv`: those infer a column's type per block
(an `answer` of 42 on one line and "42" on another fails the read, and a missing column becomes
nulls without a word), and they know no line numbers.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from .errors import InputFileError

LINE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
WHOLE_FORMATS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
FORMATS = LINE_FORMATS | WHOLE_FORMATS
ROWS_PER_BLOCK = 8192


def file_format(path: str) -> Optional[str]:
    low = path.lower()
    return next((fmt for ext, fmt in FORMATS.items() if low.endswith(ext)), None)


# --------------------------------------------------------------------------- records of one open file


def byte_lines(stream: Any) -> Iterator[bytes]:
    """The lines of a binary stream (a pyarrow NativeFile or a Python file), without loading it whole."""
    rest = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def text_lines(stream: Any, where: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 stream; a byte that is not UTF-8 is an error naming its line."""
    for lineno, raw in enumerate(byte_lines(stream), 1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputFileError(f"{where}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None


def jsonl_records(stream: Any, where: str) -> Iterator[tuple[int, dict]]:
    for lineno, line in text_lines(stream, where):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def csv_records(stream: Any, where: str) -> Iterator[tuple[int, dict]]:
    import csv

    numbered = text_lines(stream, where)
    current = {"line": 0}

    def lines() -> Iterator[str]:
        for lineno, text in numbered:
            current["line"] = lineno
            yield text

    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        raise InputFileError(f"{where}:1: empty CSV file (expected a header with question,answer)")
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header):
            raise InputFileError(f"{where}:{current['line']}: {len(values)} fields for a header of {len(header)}")
        yield current["line"], dict(zip(header, values + [""] * (len(header) - len(values))))


def json_records(stream: Any, where: str) -> Iterator[tuple[int, dict]]:
    raw = stream.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputFileError(f"{where}:{line}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{where}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise InputFileError(f"{where}: expected a JSON list of records or {{'data': [...]}}")
    for i, row in enumerate(rows):
        yield i, row


def arrow_batches(stream: Any, fmt: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = stream.read()  # the read task's stream is not seekable, and a Parquet footer is at the end
    if fmt == "parquet":
        yield from pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=ROWS_PER_BLOCK)
        return
    try:  # an Arrow stream: a Hugging Face save_to_disk shard (or the IPC file format)
        reader = pa.ipc.open_stream(pa.BufferReader(data))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.BufferReader(data))
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def columnar_records(stream: Any, fmt: str) -> Iterator[tuple[int, dict]]:
    n = 0
    for batch in arrow_batches(stream, fmt):
        for row in batch.to_pylist():
            yield n, row
            n += 1


def records(stream: Any, fmt: str, where: str) -> Iterator[tuple[int, dict]]:
    """(line or record number, record) of one file of format `fmt`."""
    if fmt == "jsonl":
        return jsonl_records(stream, where)
    if fmt == "csv":
        return csv_records(stream, where)
    if fmt == "json":
        return json_records(stream, where)
    return columnar_records(stream, fmt)


def location(where: str, fmt: str, n: int) -> str:
    return f"{where}:{n}" if fmt in ("jsonl", "csv") else f"{where}: record {n}" if fmt == "json" else f"{where}: row {n}"


# --------------------------------------------------------------------------- the datasource


def record_source(files: list[str], display: list[str], convert: Callable[[dict, str, int], dict], schema: Any,
                  filesystem: Any = None):
    """A Ray Data datasource over `files` (sorted; `display[i]` names file i in messages), each record
    through `convert(record, where, i)`, blocks of `schema` plus `_file` and `_row` (int64)."""
    import pyarrow as pa
    from ray.data.datasource.file_based_datasource import FileBasedDatasource

    out_schema = schema.append(pa.field("_file", pa.int64())).append(pa.field("_row", pa.int64()))

    class RecordSource(FileBasedDatasource):
        _FILE_EXTENSIONS = None

        def __init__(self):
            super().__init__(files, filesystem=filesystem)
            # The datasource resolves paths (an s3:// URI becomes bucket/key): index them as it sees them.
            self._where = {p: (i, display[i]) for i, p in enumerate(self._paths())}

        def _read_stream(self, f, path: str) -> Iterator[Any]:
            index, where = self._where[path]
            fmt = file_format(where) or file_format(path)
            rows: list[dict] = []
            for k, (n, rec) in enumerate(records(f, fmt, where)):
                row = convert(rec, location(where, fmt, n), index)
                row["_file"], row["_row"] = index, k
                rows.append(row)
                if len(rows) >= ROWS_PER_BLOCK:
                    yield pa.Table.from_pylist(rows, schema=out_schema)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=out_schema)

    return RecordSource()

