"""`ftcot run`: the whole Fine-tune-CoT recipe, stage after stage.

    data -> teach (D_max samples, once) -> for each D: curate(D) -> train(ft_cot) -> eval
                                         -> vanilla:  curate(1) -> train(vanilla) -> eval
         -> report (table + PNG)

Every stage writes a keyed folder with manifest.json last, so a re-run skips finished work, a
killed run continues where it stopped, and changing `train.lr` re-runs only train and eval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..artifacts import is_complete, stage_dir
from ..cli import add_config_arguments, config_from_args
from ..config import Config, ConfigError, with_overrides

STAGE = "run"


def variants(cfg: Config) -> list[tuple[str, Config]]:
    """The students one run trains: Fine-tune-CoT at each D, and the vanilla baseline."""
    out = []
    for d in cfg.pipeline.diversity:
        label = f"ft_cot D={d}"
        out.append((label, with_overrides(cfg, {"curate.diversity": d, "train.method": "ft_cot"})))
    if cfg.pipeline.vanilla:
        out.append(("vanilla", with_overrides(cfg, {"curate.diversity": 1, "train.method": "vanilla"})))
    return out


def check(cfg: Config) -> None:
    """Fail before any work on a config that cannot finish."""
    too_big = [d for d in cfg.pipeline.diversity if d > cfg.teacher.samples]
    if too_big:
        raise ConfigError(
            f"pipeline.diversity {too_big} exceeds teacher.samples={cfg.teacher.samples} (D_max): "
            f"raise teacher.samples or drop those D values"
        )
    if not cfg.pipeline.diversity and not cfg.pipeline.vanilla:
        raise ConfigError("pipeline.diversity is empty and pipeline.vanilla is false: nothing to train")


def plan(cfg: Config) -> list[dict]:
    """Each stage the run needs, its folder and whether it is already done."""
    steps = [("data", cfg), ("teach", cfg)]
    for label, c in variants(cfg):
        steps += [("curate", c), ("train", c), ("eval", c)]
    seen, rows = set(), []
    for stage, c in steps:
        path = stage_dir(c, stage)
        if path in seen:
            continue
        seen.add(path)
        rows.append({"stage": stage, "dir": str(path), "done": is_complete(path)})
    return rows


def run(cfg: Config, out=None, inp=None) -> dict:
    from . import curate, data, evaluate, report, teach, train
    from ..ray_utils import init_ray

    check(cfg)
    t0 = time.time()
    init_ray(cfg)
    summaries = {"data": data.run(cfg), "teach": teach.run(cfg)}
    for label, c in variants(cfg):
        _say(f"[{label}] curate -> train -> eval")
        summaries[label] = {
            "curate": curate.run(c),
            "train": train.run(c),
            "eval": evaluate.run(c),
        }
    rep = report.run_report(Path(cfg.run_dir), cfg)
    summaries["report"] = rep
    summaries["wall_s"] = round(time.time() - t0, 1)
    return summaries


def _say(msg: str) -> None:
    print(f"ftcot run: {msg}", flush=True)


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--plan", action="store_true", help="print the stages, their folders and which are done; run nothing")


def main(args) -> int:
    from ..preflight import preflight

    cfg = config_from_args(args)
    check(cfg)
    if args.plan:
        print(json.dumps({"config": cfg.name, "checks": preflight(cfg), "stages": plan(cfg)}, indent=2))
        return 0
    preflight(cfg, strict=True)
    summary = run(cfg)
    print(summary["report"].get("table", ""), flush=True)
    print(json.dumps({"run_dir": cfg.run_dir, "report": summary["report"].get("report_md"), "wall_s": summary["wall_s"]}))
    return 0
