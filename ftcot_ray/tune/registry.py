"""The registry of best students: `<run_dir>/best/<dataset>/`, one entry per dataset.

An entry is a plain Hugging Face student folder (the chosen trial's exported `student/`, card
`ftcot_student.json` included, so `from_pretrained` and `ftcot serve` load it as is) plus:

    config.yaml        the trial's config (`ftcot train --config` on it finds the same train stage)
    val_metrics.json   the checkpoint selection on validation and the validation curve
    test_metrics.json  the TEST evaluation of this student, the only one a search runs
    registry.json      where it came from: search folder, trial, params
    manifest.json      written last, vouching for every file (artifacts.finish)

`ftcot serve` names an entry `registry:<dataset>` (resolve() below). The entry is built beside the
old one and swapped in, so a reader never sees half an entry.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..artifacts import finish, write_json
from ..config import Config
from ..errors import InputMissing

ROOT = "best"
PREFIX = "registry:"


def entry_dir(run_dir: Path | str, dataset: str) -> Path:
    return Path(run_dir) / ROOT / dataset


def resolve(spec: str, run_dir: Path | str) -> Path:
    """`registry:<dataset>` -> its folder (any other value is returned as a path)."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    path = entry_dir(run_dir, spec.removeprefix(PREFIX))
    if not (path / "manifest.json").is_file():
        raise InputMissing(f"{spec}: no registry entry at {path}; run `ftcot tune` for that dataset first")
    return path


def register(cfg: Config, train_dir: Path, test_metrics: dict, source: dict) -> Path:
    """Write the entry for `cfg.data.dataset` from a finished train stage and its test metrics."""
    final = entry_dir(cfg.run_dir, cfg.data.dataset)
    tmp = final.with_name(f".{final.name}.new-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(train_dir) / "student", tmp)
    train_metrics = json.loads((Path(train_dir) / "metrics.json").read_text())
    write_json(tmp / "val_metrics.json", {"selection": train_metrics["selection"],
                                          "val_curve": train_metrics.get("val_curve", [])})
    write_json(tmp / "test_metrics.json", test_metrics)
    write_json(tmp / "registry.json", source | {"dataset": cfg.data.dataset, "train_dir": str(train_dir)})
    summary = {"dataset": cfg.data.dataset, "val_accuracy": train_metrics["selection"].get("val_accuracy"),
               "test_accuracy": test_metrics.get("accuracy"), **source}
    finish(tmp, cfg, "registry", summary=summary)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
