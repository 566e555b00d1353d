"""Run folders on shared storage by URI (`run_dir=s3://bucket/runs/x`, `gs://...`), so a multi-node run
needs no NFS.

How: stages work on a local mirror of the run folder (`~/.cache/ftcot_ray/mirror/<scheme>/<bucket>/<path>`,
or $FTCOT_MIRROR), exactly as on a laptop, and the stage skeleton syncs at its edges: a stage folder is
pulled before it is checked or read, and pushed after it is finished (its files first, `manifest.json`
last, so a reader elsewhere never sees a manifest before the files it vouches for). The teacher cache and
Ray Train's checkpoints go to the URI directly (every actor and worker writes there, on any node).

The filesystems are pyarrow's (`pyarrow.fs.FileSystem.from_uri`), the ones Ray Train itself uses for
`storage_path`, so credentials and endpoints come from the usual environment (AWS_* variables, including
AWS_ENDPOINT_URL for an S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .errors import RunDirError

MANIFEST = "manifest.json"


def is_uri(path: str | Path | None) -> bool:
    text = str(path or "")
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise RunDirError(f"cannot open {uri}: {e}") from None


def mirror_of(uri: str) -> Path:
    """The local working copy of a remote folder."""
    scheme, _, rest = uri.partition("://")
    root = Path(os.environ.get("FTCOT_MIRROR", Path.home() / ".cache" / "ftcot_ray" / "mirror"))
    return root / scheme / rest.strip("/")


def local_side(path_or_uri: str | Path) -> Path:
    """A local path for what must stay on one machine's disk: the path itself, or a URI's mirror."""
    return mirror_of(str(path_or_uri)) if is_uri(path_or_uri) else Path(path_or_uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


# --------------------------------------------------------------------------- folders


def _files(fs, path: str) -> list:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    return [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]


def remote_manifest(uri: str) -> Optional[dict]:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def pull(uri: str, local: Path) -> bool:
    """Copy a remote stage folder that holds a manifest to `local` (what is already there with the right
    size is kept). False when the remote folder has no manifest (not done there)."""
    if remote_manifest(uri) is None:
        return False
    download(uri, local)
    return True


def download(uri: str, local: Path, tables: bool = False) -> Path:
    """Copy every file under `uri` to `local`: Ray Train's scratch checkpoints excepted, and, unless
    `tables`, Parquet shards (a stage's big tables are read where they are, in the bucket)."""
    fs, path = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    for f in _files(fs, path):
        rel = f.path[len(path):].lstrip("/")
        if rel.split("/")[0] == "ray_train" or (not tables and rel.endswith(".parquet")):
            continue
        target = local / rel
        if target.is_file() and target.stat().st_size == f.size and rel != MANIFEST:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f.path) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return local


def push(local: Path, uri: str) -> int:
    """Upload a finished local stage folder: every file, then the manifest last. Returns the file count."""
    fs, path = filesystem(uri)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and p.relative_to(local).parts[0] != "ray_train"]
    files.sort(key=lambda p: p.name == MANIFEST)  # the manifest goes last
    for p in files:
        rel = p.relative_to(local).as_posix()
        fs.create_dir(f"{path}/{Path(rel).parent.as_posix()}".rstrip("/."), recursive=True)
        with fs.open_output_stream(f"{path}/{rel}") as out:
            out.write(p.read_bytes())
    return len(files)


def push_files(local_root: Path, files: list[Path], uri_root: str) -> None:
    """Upload a few files (the report) to the same relative place under the remote run folder."""
    fs, path = filesystem(uri_root)
    for p in files:
        rel = Path(p).resolve().relative_to(local_root.resolve()).as_posix()
        with fs.open_output_stream(f"{path}/{rel}") as out:
            out.write(Path(p).read_bytes())


def check_writable(uri: str) -> Optional[str]:
    """None when a probe object can be written and deleted under `uri`; else why not."""
    fs, path = filesystem(uri)
    probe = f"{path}/.ftcot-write-probe-{os.getpid()}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except Exception as e:
        return str(e).splitlines()[0]
    return None


# --------------------------------------------------------------------------- small objects (the teacher cache)


def read_bytes(uri: str) -> Optional[bytes]:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """One object, written whole (object stores make a PUT atomic: a reader sees all or nothing)."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def identity(uri: str) -> str:
    """What says an object changed without reading it: its size and modification time."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return f"missing:{uri}"
    return f"bytes:{info.size}:mtime:{info.mtime_ns}"


def count_files(uri: str) -> int:
    fs, path = filesystem(uri)
    return len(_files(fs, path))
