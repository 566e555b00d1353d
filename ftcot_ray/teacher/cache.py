"""Content-addressed cache of teacher answers: one small JSON file per answered request.

Key = sha256 of (endpoint, api, model, prompt or messages, sampling parameters, sample index).
Nothing about curation or answer rules goes in, so changing those never invalidates a paid-for
answer. Each answer is written right away, atomically (temp file + rename), into 256 folders
``ab/<key>.json``, so a kill -9 loses at most the answers still on the wire; the folder can be a
shared filesystem (NFS, a mounted bucket) that every node of a cluster sees. (Caches written
before 2026-12 used two levels, ``ab/cd/<key>.json``: they are still read, never written. One
level because creating a fresh pair of folders for almost every answer cost as much CPU as the
request itself at 256 in flight.)
Errors are never cached: a failed request is asked again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

CACHE_VERSION = 1


def request_key(endpoint: str, api: str, model: str, prompt: Any, params: dict, sample_idx: int) -> str:
    """The cache key of one sample of one request. `params` = sampling parameters (temperature, top_p, max_tokens)."""
    material = {
        "v": CACHE_VERSION,
        "endpoint": endpoint,
        "api": api,
        "model": model,
        "prompt": prompt,
        "params": {k: params[k] for k in sorted(params)},
        "sample": int(sample_idx),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    def __init__(self, root: str | Path):
        from .. import storage

        # A URI (s3://, gs://): one object per answer, so actors on every node share one cache.
        self.uri = str(root) if storage.is_uri(root) else None
        self.root = Path(root) if self.uri is None else storage.mirror_of(self.uri)  # created at the first answer
        self._dirs: set[str] = set()  # shard folders known to exist (mkdir costs a syscall even then)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _legacy_path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        if self.uri is not None:
            from .. import storage

            blob = storage.read_bytes(storage.join(self.uri, key[:2], f"{key}.json"))
            try:
                return json.loads(blob) if blob is not None else None
            except json.JSONDecodeError:
                return None
        for path in (self.path(key), self._legacy_path(key)):
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, json.JSONDecodeError):
                return None  # a torn file cannot exist (atomic rename), but a foreign one is just a miss
        return None

    def put(self, key: str, value: dict) -> None:
        if self.uri is not None:  # an object PUT is atomic: a reader sees all of it or nothing
            from .. import storage

            storage.write_bytes(storage.join(self.uri, key[:2], f"{key}.json"), json.dumps(value, ensure_ascii=False).encode())
            return
        folder = os.path.join(self.root, key[:2])
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        path = os.path.join(folder, f"{key}.json")
        # The temp name is unique per process and key, so concurrent writers never collide.
        tmp = os.path.join(folder, f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, ensure_ascii=False))
        os.replace(tmp, path)

    async def aget(self, key: str) -> Optional[dict]:
        """`get` from an event loop: a local read inline (microseconds), a remote one off the loop."""
        if self.uri is None:
            return self.get(key)
        import asyncio

        return await asyncio.to_thread(self.get, key)

    async def aput(self, key: str, value: dict) -> None:
        if self.uri is None:
            return self.put(key, value)
        import asyncio

        await asyncio.to_thread(self.put, key, value)

    def count(self) -> int:  # not __len__: an empty cache must stay truthy
        if self.uri is not None:
            from .. import storage

            return storage.count_files(self.uri)
        shard = "[0-9a-f][0-9a-f]"  # not the batch ledger or the in-flight journals beside the answers
        return sum(1 for _ in self.root.glob(f"{shard}/*.json")) + sum(1 for _ in self.root.glob(f"{shard}/{shard}/*.json"))
