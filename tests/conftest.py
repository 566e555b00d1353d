"""Shared fixtures: one local Ray per pytest session, paths to ../shared, a free port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Before anything imports ray/transformers: local Ray without token auth, no telemetry, no hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ftcot_ray" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTCOT_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"needs the benchmark files in {DATASETS} (../shared beside the repo); not present here")
    return DATASETS


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session, with explicit logical CPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
