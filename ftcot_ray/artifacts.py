"""Stage output folders keyed by a content hash of the inputs that matter.

Layout: ``<run_dir>/<stage>/<key>/`` holding the stage's tables, ``config.yaml`` (the resolved
config) and ``manifest.json``, which is written last: a folder without it is partial and is
never taken as done. The key hashes only what changes a stage's result, chained through its
upstream stages' keys, so changing ``train.lr`` re-keys train and eval but not teach or curate,
and runtime knobs (concurrency, rate limits, replicas) re-key nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import Config, dump_config

MANIFEST = "manifest.json"
STAGES = ("data", "teach", "curate", "train", "eval")
UPSTREAM = {"data": None, "teach": "data", "curate": "teach", "train": "curate", "eval": "train"}


class StageInputMissing(RuntimeError):
    """A stage's input folder is absent or unfinished."""


def _teacher_material(cfg: Config) -> dict:
    t = cfg.teacher
    # Where the answers come from and how they are sampled; not how fast we ask.
    endpoint = t.base_url or {"teacher_sim": t.sim.model_dump(exclude={"latency_ms"})}
    return {
        "endpoint": endpoint,
        "api": t.api,
        "model": t.model,
        "samples": t.samples,
        "temperature": t.temperature,
        "top_p": t.top_p,
        "max_tokens": t.max_tokens,
        "answer_max_tokens": t.answer_max_tokens,
        "splits": sorted(t.splits),
    }


# What each stage's result depends on, besides its upstream stage's key.
KEY_MATERIAL: dict[str, Callable[[Config], Any]] = {
    "data": lambda c: c.data.model_dump(mode="json"),
    "teach": _teacher_material,
    "curate": lambda c: {"curate": c.curate.model_dump(mode="json"), "family": c.student.family},
    "train": lambda c: {
        "student": c.student.model_dump(mode="json"),
        "train": c.train.model_dump(mode="json", exclude={
            "num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every_epochs",
            "storage_path", "keep_checkpoints", "log_every", "cpu_shm_comm",
        }),
    },
    "eval": lambda c: _eval_material(c),
}


def _eval_material(cfg: Config) -> dict:
    # Batched greedy output equals one-at-a-time output (tested), so batching and replicas re-key nothing.
    e = cfg.eval.model_dump(mode="json", exclude={"batch_size", "num_replicas", "cpus_per_replica", "torch_threads"})
    if e.get("endpoint"):
        e["endpoint"] = {k: v for k, v in e["endpoint"].items() if k not in ("concurrency", "timeout_s", "max_attempts")}
    return e


def digest(obj: Any, n: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def stage_key(cfg: Config, stage: str) -> str:
    if stage not in KEY_MATERIAL:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    up = UPSTREAM[stage]
    material = {"stage": stage, "inputs": KEY_MATERIAL[stage](cfg), "upstream": stage_key(cfg, up) if up else None}
    return digest(material)


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.run_dir) / stage / stage_key(cfg, stage)


def is_complete(path: Path | str) -> bool:
    m = Path(path) / MANIFEST
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("complete") is True
    except (OSError, json.JSONDecodeError):
        return False


def read_manifest(path: Path | str) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def require(path: Path | str, stage: str) -> Path:
    """The finished output of `stage` at `path`, or a clear error naming the command to run."""
    path = Path(path)
    if not is_complete(path):
        state = "is unfinished (no manifest.json)" if path.exists() else "does not exist"
        raise StageInputMissing(
            f"input of this stage, the {stage!r} output at {path}, {state}: run `ftcot {stage}` "
            f"with the same config first (or `ftcot run`)"
        )
    return path


def begin(path: Path | str, keep: Iterable[str] = ()) -> Path:
    """Prepare an output folder: clear what a killed earlier attempt left, except names in `keep`."""
    path = Path(path)
    if path.exists() and not is_complete(path):
        for child in path.iterdir():
            if child.name in keep:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def finish(
    path: Path | str,
    cfg: Config,
    stage: str,
    *,
    inputs: dict[str, list[str]] | None = None,
    outputs: dict[str, list[str]] | None = None,
    summary: dict | None = None,
    key: str | None = None,
) -> dict:
    """Write the resolved config, then manifest.json (last: its presence means done)."""
    path = Path(path)
    dump_config(cfg, path / "config.yaml")
    manifest = {
        "stage": stage,
        "key": key,
        "complete": True,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs or {},  # table -> columns read
        "outputs": outputs or {},  # table -> columns written
        "summary": summary or {},
    }
    write_json(path / MANIFEST, manifest)
    return manifest
