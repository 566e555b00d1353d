"""The function Ray Tune runs for each trial: one configuration of the search, the real work.

    config = the base config + this trial's params (with_overrides: the CLI's own override function)
    curate at its D (read from the teacher table made once, before the search: no teacher request)
    train: a TorchTrainer started here, the Ray Train V2 way, whose every validation reaches Tune
           through TuneReportCallback (so ASHA can stop a poor trial at a rung)
    report the selected checkpoint's validation figures once more, marked `trial_done`

The trial's config is written to `<search>/trials/<trial_id>/config.yaml`: an ordinary config, so
`ftcot train --config` on it finds (or redoes) exactly this trial's train stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

ATTEMPTS = "attempts.jsonl"


def trial_config_path(search_dir: Path | str, trial_id: str) -> Path:
    return Path(search_dir) / "trials" / trial_id / "config.yaml"


def run_trial(params: dict, *, base: dict, search_dir: str, cwd: str, fault: dict | None = None) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..artifacts import stage_dir
    from ..config import Config, dump_config, with_overrides
    from ..stages import curate, train

    # Tune starts each trial in its own working folder; the config's relative paths (run_dir,
    # data.source, ...) are the driver's, as they are for `ftcot train --config`.
    if os.path.isdir(cwd):
        os.chdir(cwd)
    t0 = time.time()
    trial_id = tune.get_context().get_trial_id()
    attempt = record_attempt(search_dir, trial_id, params)
    cfg = with_overrides(Config.model_validate(base), params)
    dump_config(cfg, trial_config_path(search_dir, trial_id))
    _maybe_fail(fault, attempt)
    with stage_lock(cfg, "curate"):  # the driver curated every D it could list; this covers the rest
        curate.run(cfg)
    with stage_lock(cfg, "train"):  # two trials that drew the same config: the second reuses the first
        summary = train.run(cfg, callbacks=[TuneReportCallback()])
    train_dir = stage_dir(cfg, "train")
    metrics = json.loads((train_dir / "metrics.json").read_text())
    if summary.get("reused"):  # trained before with this config: the scheduler sees its curve as if trained now
        for v in metrics.get("val_curve", []):
            tune.report({"step": v["step"], "val_accuracy": v.get("val_accuracy"), "val_loss": v.get("val_loss")})
    sel = metrics["selection"]
    tune.report({"step": summary["steps"], "val_accuracy": sel.get("val_accuracy"), "val_loss": sel.get("val_loss"),
                 "selected_step": sel.get("step"), "trial_done": True, "train_reused": bool(summary.get("reused")),
                 "train_dir": str(train_dir), "trial_wall_s": round(time.time() - t0, 2)})


def record_attempt(search_dir: str, trial_id: str, params: dict) -> int:
    """One line per start of a trial (a retry or a resume after a kill adds one): how the table counts
    attempts and how a resumed search shows that finished trials were not run again."""
    path = Path(search_dir) / ATTEMPTS
    before = sum(1 for a in read_attempts(search_dir) if a["trial_id"] == trial_id)
    line = json.dumps({"trial_id": trial_id, "attempt": before + 1, "pid": os.getpid(), "params": params,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str)
    with open(path, "a", encoding="utf-8") as f:  # one short O_APPEND write: concurrent trials do not interleave
        f.write(line + "\n")
    return before + 1


def read_attempts(search_dir: Path | str) -> list[dict]:
    path = Path(search_dir) / ATTEMPTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            pass
    return out


@contextlib.contextmanager
def stage_lock(cfg, stage: str) -> Iterator[None]:
    """Concurrent trials never build the same stage folder at once (filelock: a dependency of Ray)."""
    from filelock import FileLock

    from ..artifacts import stage_key

    folder = Path(cfg.run_dir) / "tune" / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{stage}-{stage_key(cfg, stage)}.lock")):
        yield


def _maybe_fail(fault: dict | None, attempt: int) -> None:
    """Fault injection for the retry test: the first attempt of the first trial to claim the marker fails."""
    if not fault or attempt > 1:
        return
    marker = Path(fault["marker"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise RuntimeError("injected trial failure (tests): Tune retries this trial")
