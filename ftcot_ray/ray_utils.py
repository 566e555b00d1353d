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

    from . import dataplane

    if ray.is_initialized():
        dataplane.configure()
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

    dataplane.configure()
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


class PolledBar:
    """A tqdm bar in the driver, fed by `poll() -> (done, total, figures)` every half second.

    On a terminal it redraws as the figures change; into a file or a pipe (`ray job submit` logs, CI,
    `ftcot run > out.txt`) at most every 30 s, since every redraw there is a new line of the log.
    """

    def __init__(self, poll, desc: str, total: int, initial: int = 0, unit: str = "it"):
        import sys

        from tqdm.auto import tqdm

        self.poll, self.last = poll, None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        try:
            v = self.poll()
        except Exception:  # a board or gate gone at shutdown: keep the last figures
            return
        if not v or v == self.last:
            return
        self.last = v
        done, total, figures = v
        if total:
            self.bar.total = total
        self.bar.set_postfix_str(figures, refresh=False)
        self.bar.update(done - self.bar.n)  # redraws no more often than mininterval

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.refresh()
        self.bar.close()


def board_bar(board, key: str, desc: str, total: int, fmt=None) -> PolledBar:
    """A bar for what workers report to a progress board under `key`."""
    import ray

    fmt = fmt or _figures

    def poll():
        v = ray.get(board.get.remote(key), timeout=5)
        return (v["done"], v.get("total", total), fmt(v)) if v else None

    return PolledBar(poll, desc, total)


def _figures(v: dict) -> str:
    parts = []
    if v.get("loss") is not None:
        parts.append(f"loss {v['loss']:.3f}")
    if v.get("val_accuracy") is not None:
        parts.append(f"val acc {v['val_accuracy']:.3f}")
    return ", ".join(parts)
