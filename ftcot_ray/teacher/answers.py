"""The teacher's answers, paid for once: written in blocks, found through an index, kept through a kill.

Layout of `teacher.cache_dir` (a local folder, or a URI: s3://, gs://):

    blocks/<id>.parquet    answered requests, a row each: key, text, finish_reason, prompt_tokens,
                           completion_tokens, cost_usd, attempts, created. One object per block of
                           `teacher.cache_block_rows` answers (fewer only when a worker ends, or when
                           `teacher.cache_flush_s` passes without filling one).
    journal/<id>.jsonl     on each node's own disk (the folder itself, or the local mirror of a URI): what
                           one live worker sent and got back since its last block, a line each.
    batches/               the Batch API's ledger (teacher/batch.py).
    ab/<key>.json          a cache written before 2026-12 (a file per answer): migrated into blocks.

Why blocks: a file per answer was 2,000,200 files (7.9 GB) at a million questions, and on object storage
a PUT per answer and, on resume, a GET per row. Why a journal too: a block is written only when full,
and a kill -9 must not lose what was paid since the last one. Each worker appends every answer to its
own journal (one local write) and holds an exclusive lock on it while it lives; a journal nobody holds
is an orphan of a killed worker, and is turned into a block before the next run looks anything up
(`recover_orphans`, run on every node), so the re-run asks again only what was on the wire.

Lookup (`AnswerIndex`): the keys of every block (16 bytes each, sorted) and which block holds them,
built once per run in a Ray task and shared read-only through the object store; a worker finds a
key by binary search and reads the few blocks its hits are in (kept in a small LRU). Never a scan
on the driver, never a request per row.
Errors are never stored: a failed request is asked again by the next run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional

from .. import storage

FIELDS = ("key", "text", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "attempts", "created")
LEGACY_SHARD = "[0-9a-f][0-9a-f]"


def block_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()),
                      ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()),
                      ("attempts", pa.int64()), ("created", pa.float64())])


def key16(hex_keys: Any):
    """The first 16 bytes of sha256 hex keys, as a numpy 'S16' array (vectorised: no Python loop per key)."""
    import numpy as np

    raw = np.asarray(hex_keys, dtype="S64").view(np.uint8).reshape(-1, 64)[:, :32]
    nibble = np.where(raw >= ord("a"), raw - ord("a") + 10, raw - ord("0")).astype(np.uint8)
    return np.ascontiguousarray(nibble[:, 0::2] << 4 | nibble[:, 1::2]).view("S16").ravel()


class AnswerStore:
    """One cache folder: where its blocks and journals are, and the operations on them as a whole."""

    def __init__(self, root: str | Path):
        self.root = str(root) if storage.is_uri(root) else str(Path(root).resolve())
        self.remote = storage.is_uri(self.root)
        self.blocks = storage.join(self.root, "blocks") if self.remote else os.path.join(self.root, "blocks")
        self.journals = storage.local_side(self.root) / "journal"

    # ------------------------------------------------------------------ blocks

    def write_block(self, records: list[dict]) -> str:
        """One block (atomic: a local temp file renamed, or one object PUT). Returns its name."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
        table = pa.Table.from_pylist([{f: r.get(f) for f in FIELDS} for r in records], schema=block_schema())
        if self.remote:
            fs, path = storage.filesystem(storage.join(self.blocks, name))
            with fs.open_output_stream(path) as out:
                pq.write_table(table, out)
        else:
            os.makedirs(self.blocks, exist_ok=True)
            tmp = os.path.join(self.blocks, f".{name}.tmp-{os.getpid()}")
            pq.write_table(table, tmp)
            os.replace(tmp, os.path.join(self.blocks, name))
        return name

    def block_names(self) -> list[str]:
        if self.remote:
            import pyarrow.fs as pafs

            fs, path = storage.filesystem(self.blocks)
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            return sorted(i.base_name for i in infos if i.base_name.endswith(".parquet"))
        if not os.path.isdir(self.blocks):
            return []
        return sorted(n for n in os.listdir(self.blocks) if n.endswith(".parquet") and not n.startswith("."))

    def read_block(self, name: str) -> list[dict]:
        import pyarrow.parquet as pq

        if self.remote:
            fs, path = storage.filesystem(storage.join(self.blocks, name))
            with fs.open_input_file(path) as f:
                return pq.read_table(f).to_pylist()
        return pq.read_table(os.path.join(self.blocks, name)).to_pylist()

    def _block_keys(self, name: str):
        import pyarrow.parquet as pq

        if self.remote:
            fs, path = storage.filesystem(storage.join(self.blocks, name))
            with fs.open_input_file(path) as f:
                return pq.read_table(f, columns=["key"]).column("key").to_numpy(zero_copy_only=False)
        return pq.read_table(os.path.join(self.blocks, name), columns=["key"]).column("key").to_numpy(zero_copy_only=False)

    def build_index(self, threads: int = 16) -> "AnswerIndex":
        """Every stored key and its block (reads only the key column of each block, many at once)."""
        import numpy as np

        names = self.block_names()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(self._block_keys, names))
        keys = key16(np.concatenate(parts)) if parts else np.empty(0, dtype="S16")
        block = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(parts)]) if parts \
            else np.empty(0, dtype=np.int32)
        # Sorted by key, the newest block last among equal keys (a key answered twice: the later one wins).
        order = np.lexsort((block, keys))
        return AnswerIndex(self.root, names, keys[order], block[order])

    # ------------------------------------------------------------------ journals

    def log(self, block_rows: int = 512, flush_s: float = 30.0, run: str = "") -> "AnswerLog":
        """A worker's writer; `run` tags its journals (so the run can wait for its own workers' ends)."""
        return AnswerLog(self, block_rows, flush_s, run)

    def recover_orphans(self, wait_for: str = "", timeout_s: float = 0.0) -> dict:
        """Turn the journals of dead workers (on this node) into blocks. Returns {"answers": n blocked,
        "on_wire": keys they had sent without an answer (to be asked again)}. With `wait_for`, first wait
        (up to `timeout_s`) until the workers of that run have let go of their journals: a pool's actors
        end a moment after its last batch, and what they hold must be in blocks before the next lookup."""
        answers, on_wire = 0, set()
        if not self.journals.is_dir():
            return {"answers": 0, "on_wire": set()}
        deadline = time.monotonic() + timeout_s
        while wait_for and time.monotonic() < deadline and any(
                _held(p) for p in self.journals.glob(f"{wait_for}-*.jsonl")):
            time.sleep(0.1)
        for path in sorted(self.journals.glob("*.jsonl")):
            lock = _try_lock(path)
            if lock is None:  # a live worker holds it
                continue
            try:
                records, sent = read_journal(path)
                if records:
                    self.write_block(records)
                answers += len(records)
                on_wire |= sent
                path.unlink(missing_ok=True)
            finally:
                os.close(lock)
        return {"answers": answers, "on_wire": on_wire}

    # ------------------------------------------------------------------ caches from before blocks

    def legacy_files(self) -> list[str]:
        """Per-answer JSON files of a cache written before 2026-12 (local folder or URI)."""
        if self.remote:
            import pyarrow.fs as pafs

            fs, path = storage.filesystem(self.root)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            scheme = self.root.split("://", 1)[0]
            return sorted(f"{scheme}://{i.path}" for i in infos if _is_legacy(i.path[len(path):]))
        root = Path(self.root)
        return sorted(str(p) for p in (*root.glob(f"{LEGACY_SHARD}/*.json"), *root.glob(f"{LEGACY_SHARD}/{LEGACY_SHARD}/*.json")))

    def migrate_legacy(self, block_rows: int = 4096, say=lambda m: None) -> int:
        """Move a per-answer cache into blocks (each old file is removed once its block is written)."""
        files = self.legacy_files()
        if not files:
            return 0
        say(f"teacher cache {self.root}: moving {len(files):,} per-answer files into blocks (once)")
        moved = 0
        for start in range(0, len(files), block_rows):
            chunk = files[start:start + block_rows]
            with ThreadPoolExecutor(max_workers=16) as pool:
                records = [r for r in pool.map(_read_legacy, chunk) if r is not None]
            if records:
                self.write_block(records)
            for f in chunk:
                _remove(f)
            moved += len(records)
        return moved


def _is_legacy(rel: str) -> bool:
    parts = rel.strip("/").split("/")
    hexy = all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts[:-1])
    return 2 <= len(parts) <= 3 and hexy and parts[-1].endswith(".json") and len(parts[-1]) == 69


def _read_legacy(path: str) -> Optional[dict]:
    try:
        blob = storage.read_bytes(path) if storage.is_uri(path) else Path(path).read_bytes()
        rec = json.loads(blob)
    except (OSError, ValueError, TypeError):
        return None  # a foreign or damaged file is just not an answer
    if not isinstance(rec, dict) or "text" not in rec:
        return None
    return rec | {"key": path.rsplit("/", 1)[-1][:-5]}


def _remove(path: str) -> None:
    if storage.is_uri(path):
        fs, p = storage.filesystem(path)
        fs.delete_file(p)
    else:
        Path(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- a worker's journal


def _try_lock(path: Path) -> Optional[int]:
    """An exclusive lock on a journal, or None when a live process holds it (released when it dies)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _held(path: Path) -> bool:
    lock = _try_lock(path)
    if lock is None:
        return path.exists()
    os.close(lock)
    return False


def read_journal(path: Path) -> tuple[list[dict], set[str]]:
    """(answers, keys sent and neither answered nor failed) of one journal; a torn last line is ignored."""
    records: dict[str, dict] = {}
    sent: set[str] = set()
    closed: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short
            if "a" in entry:
                records[entry["a"]["key"]] = entry["a"]
            sent.update(entry.get("s", ()))
            closed.update(entry.get("f", ()))
    return list(records.values()), sent - closed - set(records)


class AnswerLog:
    """One worker's writer: every answer to its journal at once, to a block every `block_rows` answers."""

    def __init__(self, store: AnswerStore, block_rows: int, flush_s: float, run: str = ""):
        import fcntl

        self.store, self.block_rows, self.flush_s, self.run = store, block_rows, flush_s, run
        self.pending: list[dict] = []
        self.on_wire: dict[str, int] = {}
        self.first_at: Optional[float] = None
        self.blocks_written = 0
        store.journals.mkdir(parents=True, exist_ok=True)
        self.path = self._new_path()
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for this worker's life

    def _new_path(self) -> Path:
        return self.store.journals / f"{self.run}-{uuid.uuid4().hex}.jsonl"

    def _write(self, entry: dict) -> None:
        self.file.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")

    def sent(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for k in keys:
            self.on_wire[k] = self.on_wire.get(k, 0) + 1
        self._write({"s": keys})

    def failed(self, keys: Iterable[str]) -> None:
        keys = [k for k in keys if self._off_wire(k)]
        if keys:
            self._write({"f": keys})

    def _off_wire(self, key: str) -> bool:
        n = self.on_wire.get(key, 0)
        if n <= 1:
            self.on_wire.pop(key, None)
        else:
            self.on_wire[key] = n - 1
        return n > 0

    def answered(self, record: dict) -> None:
        self._off_wire(record["key"])
        self._write({"a": record})
        self.pending.append(record)
        if self.first_at is None:
            self.first_at = time.monotonic()

    def due(self) -> bool:
        return bool(self.pending) and (len(self.pending) >= self.block_rows
                                       or time.monotonic() - (self.first_at or 0) >= self.flush_s)

    def rotate(self) -> Optional[tuple]:
        """Take the pending answers and switch to a new journal (carrying what is on the wire); the old
        journal stays, locked, until `seal` has written its answers as a block. None: nothing pending."""
        import fcntl

        if not self.pending:
            return None
        records, self.pending, self.first_at = self.pending, [], None
        old = (self.file, self.path)
        self.path = self._new_path()
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self.on_wire:
            self._write({"s": list(self.on_wire)})
        return records, old

    def seal(self, taken: tuple) -> None:
        """Write what `rotate` took as a block, then drop its journal (a kill in between: both exist, and
        the recovered journal only repeats answers the index already has)."""
        records, (old_file, old_path) = taken
        self.store.write_block(records)
        self.blocks_written += 1
        old_file.close()
        old_path.unlink(missing_ok=True)

    def flush(self) -> None:
        taken = self.rotate()
        if taken is not None:
            self.seal(taken)

    def close(self) -> None:
        """Everything pending into a block; the journal goes (nothing of it is needed any more)."""
        self.flush()
        self.file.close()
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the index


class AnswerIndex:
    """Sorted 16-byte keys and the block each is in; `get` reads blocks on demand (LRU of `cache_blocks`)."""

    def __init__(self, root: str, names: list[str], keys: Any, blocks: Any, cache_blocks: int = 64):
        self.root, self.names, self.keys, self.blocks = root, names, keys, blocks
        self.cache_blocks = cache_blocks
        self._store: Optional[AnswerStore] = None
        self._loaded: OrderedDict[int, dict[str, dict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:  # shipped through the object store without its loaded blocks
        return {k: v for k, v in self.__dict__.items() if k not in ("_store", "_loaded")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _store=None, _loaded=OrderedDict())

    def where(self, hex_keys: list[str]) -> list[Optional[int]]:
        """The block number of each key, or None where it is not stored."""
        import numpy as np

        if not hex_keys or len(self.keys) == 0:
            return [None] * len(hex_keys)
        wanted = key16(hex_keys)
        pos = np.searchsorted(self.keys, wanted, side="right") - 1  # the last (newest) of equal keys
        found = (pos >= 0) & (self.keys[np.clip(pos, 0, None)] == wanted)
        return [int(self.blocks[p]) if ok else None for p, ok in zip(pos, found)]

    def get_many(self, hex_keys: list[str]) -> dict[str, dict]:
        """{key: record} of the stored ones among `hex_keys`."""
        out: dict[str, dict] = {}
        for key, block in zip(hex_keys, self.where(hex_keys)):
            if block is not None:
                rec = self._block(block).get(key)
                if rec is not None:  # a 16-byte prefix that matched another key: not this answer
                    out[key] = rec
        return out

    def _block(self, i: int) -> dict[str, dict]:
        if i in self._loaded:
            self._loaded.move_to_end(i)
            return self._loaded[i]
        if self._store is None:
            self._store = AnswerStore(self.root)
        rows = {r["key"]: r for r in self._store.read_block(self.names[i])}
        self._loaded[i] = rows
        if len(self._loaded) > self.cache_blocks:
            self._loaded.popitem(last=False)
        return rows
