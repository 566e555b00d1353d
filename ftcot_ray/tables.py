"""Reading and writing the stages' tables, in either of two forms, on the driver or as Ray Datasets.

* `<folder>/<name>/`: a folder of Parquet shards, written by Ray Data as blocks finish (the tables
  that grow with the data: problems read from your files, completions, curated, pairs, predictions);
* `<folder>/<name>.jsonl`: one JSONL file (small tables built on the driver: the paper's benchmarks,
  the synthetic tasks, imported completions, and every table of runs made before Parquet).

Every reader takes either form, so a run folder from before keeps working. The declared columns
(schemas.py) are checked where a table is read: a missing column names the file (and, for JSONL, the
line). Shards are cast to the declared types before they are written, so one table has one schema.

Where: a stage of a run on object storage (`run_dir=s3://...`) works in a local mirror, but its shards
are written by Ray Data straight to the bucket (a write task may run on any node) and read from there;
the stage's manifest entry says where (`uri`) and vouches for each shard's size. `locate` answers
"where is table `name` of this stage folder" for every reader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

from . import storage
from .errors import InputFileError, InputMissing
from .io import iter_jsonl, write_jsonl
from .schemas import Table, check_rows, file_sha256, table

SHARD_SUFFIX = ".parquet"
MIN_ROWS_PER_SHARD = (512, 65536)  # rows a shard holds at least (the last may hold fewer): see `shard_rows`


# --------------------------------------------------------------------------- where a table is


def table_path(folder_or_file: Path | str, name: str) -> Path:
    """The table's folder of shards if there is one, else its JSONL file (which may not exist yet);
    a path that already names a `.jsonl` file or a folder of shards is returned as it is."""
    p = Path(folder_or_file)
    if p.suffix == ".jsonl" or (p.is_dir() and p.name == name):
        return p
    if (p / name).is_dir():
        return p / name
    return p / table(name).file


def locate(folder: Path | str, name: str) -> Path | str:
    """Where table `name` of a stage folder is: the URI its manifest names (shards written to a bucket),
    else `table_path` (its local folder of shards or its JSONL file)."""
    if storage.is_uri(folder):
        return str(folder) if str(folder).rstrip("/").endswith("/" + name) else storage.join(str(folder), name)
    manifest = Path(folder) / "manifest.json"
    if manifest.is_file():
        try:
            import json

            entry = (json.loads(manifest.read_text()).get("tables") or {}).get(name) or {}
        except (OSError, ValueError):
            entry = {}
        if entry.get("uri"):
            return entry["uri"]
    return table_path(folder, name)


def has_table(folder: Path | str, name: str) -> bool:
    p = locate(folder, name)
    if storage.is_uri(p):
        return bool(shard_files(p))
    return p.is_file() or p.is_dir()


def is_sharded(path: Path | str) -> bool:
    return not str(path).endswith(".jsonl")


def _open_parquet(shard: str):
    import pyarrow.parquet as pq

    if storage.is_uri(shard):
        fs, p = storage.filesystem(shard)
        return pq.ParquetFile(fs.open_input_file(p))
    return pq.ParquetFile(shard)


def shard_files(folder: Path | str) -> list[str]:
    """The Parquet shards of a table folder (local or URI), sorted (the order Ray Data wrote them)."""
    if storage.is_uri(folder):
        fs, root = storage.filesystem(str(folder))
        import pyarrow.fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
        scheme = str(folder).split("://", 1)[0]
        return sorted(f"{scheme}://{i.path}" for i in infos if i.path.endswith(SHARD_SUFFIX))
    return sorted(str(p) for p in Path(folder).glob(f"*{SHARD_SUFFIX}"))


# --------------------------------------------------------------------------- on the driver


def read_table(folder_or_file: Path | str, name: str, columns: Iterable[str] | None = None) -> list[dict]:
    """Every row of a (small) table, its columns checked; shard folders come back sorted by the table's key."""
    path = locate(folder_or_file, name)
    rows = [r for batch in iter_table(path, name, columns) for r in batch]
    key = table(name).key
    if is_sharded(path) and rows and all(k in rows[0] for k in key):
        rows.sort(key=lambda r: tuple(r[k] for k in key))
    return rows


def iter_table(folder_or_file: Path | str, name: str, columns: Iterable[str] | None = None,
               batch_rows: int = 8192) -> Iterator[list[dict]]:
    """The rows of a table in batches (memory: one batch), in stored order; columns checked."""
    path = locate(folder_or_file, name)
    need = tuple(columns) if columns is not None else table(name).columns
    if not is_sharded(path):
        if not path.is_file():
            raise InputMissing(f"{path}: no {name} table here")
        batch: list[dict] = []
        for lineno, row in iter_jsonl(path, with_lines=True):
            missing = [c for c in need if c not in row]
            if missing:
                raise InputFileError(f"{path}:{lineno}: {name} row lacks column(s) {', '.join(missing)}")
            batch.append(row)
            if len(batch) >= batch_rows:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    for shard in shard_files(path):
        pf = _open_parquet(shard)
        missing = [c for c in need if c not in pf.schema_arrow.names]
        if missing:
            raise InputFileError(f"{shard}: {name} shard lacks column(s) {', '.join(missing)}")
        for rb in pf.iter_batches(batch_size=batch_rows):
            yield rb.to_pylist()


def write_table(folder: Path | str, name: str, rows: list[dict]) -> dict:
    """A small table as JSONL, written atomically; returns its manifest entry."""
    path = Path(folder) / table(name).file
    check_rows(rows, name, str(path))
    n = write_jsonl(path, rows)
    return {"file": path.name, "format": "jsonl", "columns": list(table(name).columns), "rows": n,
            "sha256": file_sha256(path)}


# --------------------------------------------------------------------------- as Ray Datasets


def read_dataset(folder_or_file: Path | str, name: str, columns: Iterable[str] | None = None, *,
                 ordered: bool = True):
    """A table as a Ray Dataset (streamed; nothing read on the driver), its columns checked, its rows in
    stored order unless `ordered` is false (shards in the order they were written)."""
    import ray.data

    from .dataplane import ordered as keep_order

    t = table(name)
    need = tuple(columns) if columns is not None else t.columns
    path = locate(folder_or_file, name)
    if is_sharded(path):
        files = shard_files(path)
        if not files:
            raise InputMissing(f"{path}: no {name} table here (no Parquet shards)")
        check_shard_columns(files[0], name, need)
        ds = ray.data.read_parquet(files)
    elif not Path(path).is_file():
        raise InputMissing(f"{path}: no {name} table here")
    else:
        ds = jsonl_dataset(Path(path), t, need)
    return keep_order(ds) if ordered else ds


def check_shard_columns(shard: str, name: str, need: tuple[str, ...]) -> None:
    missing = [c for c in need if c not in _open_parquet(shard).schema_arrow.names]
    if missing:
        raise InputFileError(f"{shard}: {name} shard lacks column(s) {', '.join(missing)}")


def jsonl_dataset(path: Path, t: Table, need: tuple[str, ...]):
    """A JSONL table through the project's record reader: each line checked (file:line), the declared
    columns at their declared types (columns beyond them are not carried into the dataset)."""
    import ray.data

    from .readers import record_source

    schema = t.arrow_schema()

    def convert(rec: dict, where: str, _file: int) -> dict:
        missing = [c for c in need if c not in rec]
        if missing:
            raise InputFileError(f"{where}: {t.name} row lacks column(s) {', '.join(missing)}")
        return {c: rec.get(c) for c in schema.names}

    ds = ray.data.read_datasource(record_source([str(path)], [str(path)], convert, schema))
    return ds.drop_columns(["_file", "_row"])


def conform(batch, t: Table):
    """A pyarrow block with the table's declared columns cast to their types (extra columns kept)."""
    import pyarrow as pa

    if batch.num_rows == 0 and batch.num_columns == 0:  # a batch a map emptied: the table's columns, no rows
        return t.arrow_schema().empty_table()
    for field in t.arrow_schema():
        i = batch.schema.get_field_index(field.name)
        if i < 0:
            raise ValueError(f"a {t.name} block lacks column {field.name!r} (a bug: the stage must write every "
                             "declared column)")
        if batch.schema.field(i).type != field.type:
            batch = batch.set_column(i, field.name, batch.column(i).cast(field.type))
    null_typed = [f.name for f in batch.schema if pa.types.is_null(f.type)]
    for col in null_typed:  # an extra column that is all null in this block: a string, as elsewhere
        i = batch.schema.get_field_index(col)
        batch = batch.set_column(i, col, batch.column(i).cast(pa.string()))
    return batch


def shard_rows(expected_rows: Optional[int]) -> int:
    """Rows per shard for a table of about `expected_rows`: some 16 shards, within MIN_ROWS_PER_SHARD.
    Small tables get their first shard early, so the write's worker starts while the stage still works."""
    low, high = MIN_ROWS_PER_SHARD
    return 4096 if expected_rows is None else max(low, min(high, expected_rows // 16))


def write_dataset(ds, folder: Path | str, name: str, expected_rows: Optional[int] = None) -> dict:
    """Write a Ray Dataset as the table's Parquet shards (`folder/name/`), cast to the declared types;
    returns its manifest entry. Runs the dataset's pipeline: blocks are written as they finish (in the
    dataset's order when it keeps one: the shards' names sort as they were written)."""
    t = table(name)
    target = storage.join(str(folder), name) if storage.is_uri(folder) else str(Path(folder) / name)
    if not storage.is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
    ds.map_batches(conform, fn_args=(t,), batch_format="pyarrow", batch_size=None,
                   zero_copy_batch=True).write_parquet(target, min_rows_per_file=shard_rows(expected_rows))
    return sharded_entry(target, name)


def sharded_entry(target: str, name: str) -> dict:
    """The manifest entry of a folder of shards: rows (from the Parquet footers), columns, each shard's
    bytes, and, for shards in a bucket, the folder's URI (what `locate` and the manifest check read)."""
    files = shard_files(target)
    rows = sum(_open_parquet(f).metadata.num_rows for f in files)
    entry = {"file": f"{name}/", "format": "parquet", "shards": len(files), "columns": list(table(name).columns),
             "rows": rows, "bytes": {f.rsplit("/", 1)[-1]: _size(f) for f in files}}
    return entry | ({"uri": str(target)} if storage.is_uri(target) else {})


def _size(path: str) -> int:
    if storage.is_uri(path):
        fs, p = storage.filesystem(path)
        return fs.get_file_info(p).size
    return Path(path).stat().st_size


def check_entry(entry: dict) -> Optional[str]:
    """None when the shards a manifest entry names in a bucket are there at their sizes; else what differs."""
    if not entry.get("uri"):
        return None  # local shards are vouched for with the folder's other files
    found = {f.rsplit("/", 1)[-1]: _size(f) for f in shard_files(entry["uri"])}
    for shard, size in (entry.get("bytes") or {}).items():
        if found.get(shard) != size:
            return f"{entry['uri']}/{shard}, which its manifest vouches for, is " + (
                "missing" if shard not in found else f"{found[shard]} bytes, not {size}")
    return None


def write_shard(folder: Path | str, name: str, rows: list[dict], index: int) -> None:
    """One shard of a table from the driver (the Batch API's chunks), written atomically (a temp file
    renamed; on object storage, one PUT)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = table(name)
    check_rows(rows, name, f"{folder}/{name}")
    block = conform(pa.Table.from_pylist(rows), t)
    shard = f"shard-{index:06d}{SHARD_SUFFIX}"
    if storage.is_uri(folder):
        fs, p = storage.filesystem(storage.join(str(folder), name, shard))
        with fs.open_output_stream(p) as out:
            pq.write_table(block, out)
        return
    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".shard-{index:06d}.tmp-{os.getpid()}"
    pq.write_table(block, tmp)
    os.replace(tmp, target / shard)
