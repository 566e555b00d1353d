"""Connecting to Ray: the cluster a job was submitted to, or a local one started here."""

from __future__ import annotations

import os

from .config import Config


def init_ray(cfg: Config | None = None, **kwargs) -> None:
    """Connect once: `resources.address` / RAY_ADDRESS (inside `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = (cfg.resources.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    num_cpus = cfg.resources.num_cpus if cfg else None
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, **kwargs)
