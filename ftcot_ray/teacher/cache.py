"""Content-addressed cache of teacher answers: one small JSON file per answered request.

Key = sha256 of (endpoint, api, model, prompt or messages, sampling parameters, sample index).
Nothing about curation or answer rules goes in, so changing those never invalidates a paid-for
answer. Each answer is written right away, atomically (temp file + rename), into sharded folders
``ab/cd/<key>.json``, so a kill -9 loses at most the answers still on the wire; the folder can be a
shared filesystem (NFS, a mounted bucket) that every node of a cluster sees.
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
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # a torn file cannot exist (atomic rename), but a foreign one is just a miss

    def put(self, key: str, value: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temp name is unique per process and key, so concurrent writers never collide.
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False))
        os.replace(tmp, path)

    def count(self) -> int:  # not __len__: an empty cache must stay truthy
        return sum(1 for _ in self.root.glob("*/*/*.json"))
