"""Connecting to Ray (the cluster a job was submitted to, or a local one started here), where its
output goes, and a progress board that workers update and the driver shows as a bar."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

from . import logs
from .config import Config

_started_local = {"reaper": None}


def init_ray(cfg: Config | None = None, **kwargs) -> None:
    """Connect once: `resources.address` / RAY_ADDRESS (inside `ray job submit`), else start a local Ray.

    A local Ray started here is watched by `reaper`, so no process of it outlives this one. What
    Ray workers print goes to the run's log file (ftcot_ray.logs), not over the progress bars.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logs.redirect_native_stderr()  # Ray's C++ core writes to file descriptor 2
    logs.quiet("ray")  # Ray configured its own handler when imported
    address = (cfg.resources.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        from . import reaper

        if _started_local["reaper"] is None:
            _started_local["reaper"] = reaper.start()
        num_cpus = cfg.resources.num_cpus if cfg else None
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, **kwargs)
    import ray.data  # noqa: F401  (configures its own console logger on import: quieted next)

    logs.quiet_all()
    route_worker_output()


def route_worker_output() -> None:
    """Ray prints every worker's stdout/stderr on the driver; send it to the log file instead (-v: both)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray version: its default (print to the terminal) stays
        return
    if logs.verbose():
        dispatcher.add_handler("ftcot_log_file", logs.write_worker_lines)
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ftcot_log_file", logs.write_worker_lines)


# --------------------------------------------------------------------------- progress


def progress_board():
    """A tiny named-free actor that workers report (done, total, figures) to."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.values: dict[str, dict] = {}

        def update(self, key: str, done: int, total: int, **figures: Any) -> None:
            v = self.values.setdefault(key, {})
            v.update(figures, done=done, total=total)

        def get(self, key: str) -> Optional[dict]:
            return self.values.get(key)

    return ProgressBoard.remote()


class BoardBar:
    """A tqdm bar in the driver, fed from a progress board every half second."""

    def __init__(self, board, key: str, desc: str, total: int, fmt=None):
        from tqdm.auto import tqdm

        self.board, self.key, self.fmt = board, key, fmt or _figures
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=0.5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        import ray

        try:
            v = ray.get(self.board.get.remote(self.key), timeout=5)
        except Exception:
            return
        if v:
            self.bar.total = v.get("total", self.bar.total)
            self.bar.n = v.get("done", self.bar.n)
            self.bar.set_postfix_str(self.fmt(v), refresh=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.refresh()
        self.bar.close()


def _figures(v: dict) -> str:
    parts = []
    if v.get("loss") is not None:
        parts.append(f"loss {v['loss']:.3f}")
    if v.get("val_accuracy") is not None:
        parts.append(f"val acc {v['val_accuracy']:.3f}")
    return ", ".join(parts)
