"""Stage output folders keyed by what changes their result, and the one skeleton every stage uses.

Layout: ``<run_dir>/<stage>/<key>/`` holding the stage's tables, ``config.yaml`` (the resolved
config) and ``manifest.json``, written last. The manifest vouches for every file beside it (bytes
and sha256), so a folder counts as done only while its files are still what was written: a
truncated table or a student folder missing its weights is "not done", and a stage reading it
says so instead of working on half the data.

The key of a stage hashes (ARCHITECTURE.md, "Keys"):
* the config fields declared to change that stage's result (``config.result_material``; fields
  marked ``runtime`` never enter a key),
* what those fields point at: the content of ``data.source``, the files of ``eval.student``,
* the identity of its input: the upstream stage's key, or, for an explicit ``--in`` folder, the
  content digest its manifest vouches for.

A stage's recipe:

    st = open_stage(cfg, "curate", out, inp)   # reuse if done, else check the input, clear leftovers
    if st.reused:
        return st.summary
    rows = st.read("completions")               # columns checked (schemas.py)
    ...
    st.write("curated", curated)
    return st.finish(summary)                    # config.yaml, then manifest.json last
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from . import storage
from .config import SECTION_STAGE, Config, dump_config, result_material
from .errors import FtcotError, RunDirError, StageInputMissing
from .schemas import file_sha256, table
from .tables import check_entry, read_table, write_table

__all__ = ["MANIFEST", "STAGES", "StageInputMissing", "Stage", "open_stage", "stage_key", "stage_dir",
           "is_complete", "verify", "require", "finish", "read_manifest", "write_json", "digest"]

MANIFEST = "manifest.json"
STAGES = ("data", "teach", "curate", "train", "eval")
UPSTREAM = {"data": None, "teach": "data", "curate": "teach", "train": "curate", "eval": "train"}
# Files bigger than this are vouched for by size only: hashing a multi-GB checkpoint on every
# `--plan` would cost more than it protects (a truncated copy still changes the size).
HASH_LIMIT = 64 * 2**20
NOT_VOUCHED = {MANIFEST, "ray_train"}  # Ray Train's checkpoint storage is scratch, not the result


# --------------------------------------------------------------------------- keys


def digest(obj: Any, n: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


_HASHES: dict[tuple, str] = {}


def content_digest(path: Path | str) -> str:
    """sha256 of a file, or of a folder's files (names and contents); 'missing' when absent. An object in
    storage (a URI) is known by its size and modification time (reading it to hash would cost a download)."""
    if storage.is_uri(path):
        return storage.identity(str(path))
    path = Path(path)
    if path.is_file():
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _HASHES:
            _HASHES[memo] = file_sha256(path) if st.st_size <= HASH_LIMIT else f"bytes:{st.st_size}"
        return _HASHES[memo]
    if path.is_dir():
        return digest({str(p.relative_to(path)): content_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}, 64)
    return f"missing:{path}"


def folder_identity(path: Path | str) -> str:
    """What an explicit input (--in) is: the digest its manifest vouches for, else its content."""
    path = Path(path)
    m = path / MANIFEST
    if path.is_dir() and m.is_file():
        try:
            manifest = json.loads(m.read_text())
            return digest({"stage": manifest.get("stage"), "files": manifest.get("files")})
        except (OSError, json.JSONDecodeError):
            pass
    return content_digest(path)[:16]


def derived_material(cfg: Config, stage: str) -> dict:
    """What path-valued result fields point at: a file's content, not only its name."""
    if stage == "data" and cfg.data.source:
        from .tasks.custom import is_custom, source_files, source_listing

        if is_custom(cfg.data):  # your own data: one listing (objects in storage by size and time, from it)
            try:
                listing = source_listing(str(cfg.data.source))
            except (FtcotError, OSError):  # the stage itself says what is missing, and where
                return {"source_content": [f"missing:{cfg.data.source}"]}
            return {"source_content": [f"bytes:{size}:mtime:{mtime}" if storage.is_uri(p) else content_digest(p)
                                       for p, size, mtime in listing]}
        return {"source_content": [content_digest(p) for p in source_files(cfg.data)]}
    if stage == "eval":
        named = cfg.eval.baseline_model or cfg.eval.student
        if named:
            return {"model_content": folder_identity(named)}
    return {}


def key_material(cfg: Config, stage: str) -> dict:
    """Every field declared to change `stage`'s result, by section, plus what paths point at."""
    material = {}
    for section, owner in SECTION_STAGE.items():
        values = result_material(getattr(cfg, section), owner, stage)
        if values:
            material[section] = values
    return material | derived_material(cfg, stage)


def upstream_of(cfg: Config, stage: str) -> Optional[str]:
    """Eval depends on the run's trained student only when it evaluates that student."""
    if stage == "eval" and (cfg.eval.baseline or cfg.eval.student):
        return "curate"
    return UPSTREAM[stage]


def stage_key(cfg: Config, stage: str, inp: Path | str | None = None) -> str:
    if stage not in UPSTREAM:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    up = upstream_of(cfg, stage)
    if inp is not None:
        upstream = {"input": folder_identity(inp)}
    else:
        upstream = stage_key(cfg, up) if up else None
    return digest({"stage": stage, "inputs": key_material(cfg, stage), "upstream": upstream})


def run_root(cfg: Config) -> Path:
    """The run folder stages work in: `run_dir` itself, or the local mirror of a `run_dir` URI (storage.py)."""
    return storage.mirror_of(cfg.run_dir) if storage.is_uri(cfg.run_dir) else Path(cfg.run_dir)


def remote_of(cfg: Config, path: Path) -> Optional[str]:
    """The URI a folder of the local mirror stands for (None for a local run folder, or a path outside it)."""
    if not storage.is_uri(cfg.run_dir):
        return None
    try:
        rel = Path(path).resolve().relative_to(run_root(cfg).resolve())
    except ValueError:
        return None
    return storage.join(cfg.run_dir, rel.as_posix())


def stage_dir(cfg: Config, stage: str, inp: Path | str | None = None) -> Path:
    return run_root(cfg) / stage / stage_key(cfg, stage, inp)


def is_done(cfg: Config, path: Path | str) -> bool:
    """is_complete, after fetching the folder from the run's URI when the run folder is remote."""
    remote = remote_of(cfg, Path(path))
    if remote is not None and not is_complete(path):
        storage.pull(remote, Path(path))
    return is_complete(path)


# --------------------------------------------------------------------------- manifests


def read_manifest(path: Path | str) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def vouched_files(path: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or rel.parts[0] in NOT_VOUCHED or p.name.startswith("."):
            continue
        size = p.stat().st_size
        out[str(rel)] = {"bytes": size, "sha256": file_sha256(p) if size <= HASH_LIMIT else None}
    return out


def verify(path: Path | str) -> Optional[str]:
    """None when `path` is a finished stage whose files are what its manifest vouches for; else why not."""
    path = Path(path)
    m = path / MANIFEST
    if not m.is_file():
        return "is unfinished (no manifest.json)" if path.exists() else "does not exist"
    try:
        manifest = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return "has an unreadable manifest.json"
    if manifest.get("complete") is not True:
        return "is unfinished (manifest not complete)"
    for entry in (manifest.get("tables") or {}).values():  # shards in a bucket: listed, sizes compared
        problem = check_entry(entry)
        if problem:
            return f"is damaged: {problem}"
    for rel, want in (manifest.get("files") or {}).items():
        p = path / rel
        if not p.is_file():
            return f"is damaged: {rel}, which its manifest vouches for, is missing"
        if p.stat().st_size != want["bytes"]:
            return f"is damaged: {rel} has {p.stat().st_size} bytes, its manifest vouches for {want['bytes']}"
        if want.get("sha256") and content_digest(p) != want["sha256"]:
            return f"is damaged: {rel} differs from what its manifest vouches for (sha256)"
    return None


def is_complete(path: Path | str) -> bool:
    return verify(path) is None


def require(path: Path | str, stage: str) -> Path:
    """The finished output of `stage` at `path`, or a clear error naming the command to run."""
    path = Path(path)
    problem = verify(path)
    if problem:
        raise StageInputMissing(
            f"input of this stage, the {stage!r} output at {path}, {problem}: run `ftcot {stage}` "
            f"with the same config first (or `ftcot run`)"
        )
    return path


def begin(path: Path | str, keep: Iterable[str] = ()) -> Path:
    """Prepare an output folder: clear what an earlier attempt left (killed, damaged, or re-opened),
    except names in `keep`; the manifest goes first, so a half-cleared folder never looks done."""
    path = Path(path)
    try:
        if path.exists():
            (path / MANIFEST).unlink(missing_ok=True)
            for child in path.iterdir():
                if child.name in keep:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except PermissionError as e:
        raise RunDirError(f"cannot write the stage folder {path} ({e.strerror}): choose a writable run_dir") from None
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def finish(path: Path | str, cfg: Config, stage: str, *, summary: dict | None = None, key: str | None = None,
           tables: dict | None = None, input_dir: Path | None = None, **_ignored: Any) -> dict:
    """Write the resolved config, then manifest.json (last: its presence means done)."""
    path = Path(path)
    dump_config(cfg, path / "config.yaml")
    manifest = {
        "stage": stage,
        "key": key or path.name,
        "complete": True,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": {"dir": str(input_dir), "identity": folder_identity(input_dir)} if input_dir else None,
        "tables": tables or {},  # name -> file, columns, rows, sha256
        "files": vouched_files(path),  # every file of the result, bytes and sha256
        "summary": summary or {},
    }
    write_json(path / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- the stage skeleton


@dataclass
class Stage:
    """One run of one stage: where it writes, what it read, what it has written so far."""

    cfg: Config
    name: str
    out: Path
    key: str
    input: Optional[Path]
    reused: bool = False
    summary: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    keep: tuple = ()
    prepared: bool = False

    def prepare(self) -> Path:
        """Clear what an earlier attempt left (but `keep`) and create the folder: at the first write,
        so a stage that fails on bad input before writing leaves nothing behind."""
        if not self.prepared:
            begin(self.out, self.keep)
            self.prepared = True
        return self.out

    def read(self, name: str, where: Path | str | None = None, columns: Iterable[str] | None = None) -> list[dict]:
        """A table from the stage's input folder (or `where`), its columns checked."""
        return read_table(where or self.input, name, columns)

    def write(self, name: str, rows: list[dict]) -> None:
        self.tables[name] = write_table(self.prepare(), name, rows)

    def target(self) -> Path | str:
        """Where this stage's Parquet tables go (and are read back from): its folder, or, when the run
        folder is a bucket, the same place in the bucket (Ray Data's write tasks may run on any node)."""
        self.prepare()
        return remote_of(self.cfg, self.out) or self.out

    def write_json(self, filename: str, obj: Any) -> Path:
        write_json(self.prepare() / filename, obj)
        return self.out / filename

    def finish(self, summary: dict, outputs: Iterable[str] = ()) -> dict:
        missing = [t for t in outputs if t not in self.tables]
        if missing:  # a bug, not a user error: the stage did not write what it declares
            raise RuntimeError(f"stage {self.name} finished without writing its table(s) {', '.join(missing)}")
        self.prepare()
        finish(self.out, self.cfg, self.name, summary=summary, key=self.key, tables=self.tables, input_dir=self.input)
        remote = remote_of(self.cfg, self.out)
        if remote is not None:  # files first, the manifest last (storage.push)
            storage.push(self.out, remote)
        return summary


def open_stage(cfg: Config, name: str, out: Path | str | None = None, inp: Path | str | None = None, *,
               needs: Optional[str] = "upstream", keep: Iterable[str] = (),
               reopen: Optional[Callable[[dict], bool]] = None) -> Stage:
    """Reuse a finished stage, or check its input and prepare its folder.

    `needs`: the stage whose folder is the input ("upstream": the usual one; None: the stage
    resolves its inputs itself). `keep`: names a killed attempt leaves that a re-run continues
    from (Ray Train's checkpoints). `reopen(summary)`: re-run a finished stage anyway (teach's
    retry of error rows). The folder is cleared and created at the stage's first write.
    """
    key = stage_key(cfg, name, inp)
    out = Path(out) if out else run_root(cfg) / name / key
    if is_done(cfg, out):
        summary = read_manifest(out)["summary"]
        if reopen is None or not reopen(summary):
            return Stage(cfg, name, out, key, None, reused=True, summary=summary | {"reused": True})
    needs = upstream_of(cfg, name) if needs == "upstream" else needs
    input_dir = None
    if inp is not None and needs is not None:
        input_dir = require(inp, needs)
    elif needs is not None:
        is_done(cfg, stage_dir(cfg, needs))  # fetched first when the run folder is remote
        input_dir = require(stage_dir(cfg, needs), needs)
    return Stage(cfg, name, out, key, input_dir, keep=tuple(keep))


def table_columns(*names: str) -> dict[str, list[str]]:
    """{table: columns} for declaring a stage's contract in its docs and summaries."""
    return {n: list(table(n).columns) for n in names}
