"""`ftcot run`: the whole Fine-tune-CoT recipe, stage after stage.

    data -> teach (D_max samples, once) -> for each D: curate(D) -> train(ft_cot | step_by_step) -> eval
                                         -> vanilla:  curate(1) -> train(vanilla) -> eval
         -> report (table + PNG)

Every stage writes a keyed folder with manifest.json last, so a re-run skips finished work, a
killed run continues where it stopped (training from its last checkpoint), and changing
`train.lr` re-runs only train and eval.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..artifacts import is_done, run_root, stage_dir
from ..config import Config, with_overrides
from ..logs import say

STAGE = "run"


def variants(cfg: Config) -> list[tuple[str, Config]]:
    """The students one run trains: Fine-tune-CoT (and distilling step-by-step) at each D, then vanilla."""
    out = []
    for d in cfg.pipeline.diversity:
        for method in (m for m in ("ft_cot", "step_by_step") if m in cfg.pipeline.methods):
            out.append((f"{method} D={d}", with_overrides(cfg, {"curate.diversity": d, "train.method": method})))
    if "vanilla" in cfg.pipeline.methods:
        out.append(("vanilla", with_overrides(cfg, {"curate.diversity": 1, "train.method": "vanilla"})))
    return out


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
        rows.append({"stage": stage, "dir": str(path), "done": is_done(c, path)})
    return rows


def run(cfg: Config) -> dict:
    from . import curate, data, evaluate, report, teach, train
    from ..ray_utils import init_ray

    t0 = time.time()
    init_ray(cfg)
    summaries = {"data": data.run(cfg)}
    say(f"data: {_line(summaries['data'], 'n', 'counts')}")
    summaries["teach"] = teach.run(cfg)
    say(f"teach: {_line(summaries['teach'], 'rows', 'ok', 'errors', 'requests', 'cache_hits')}")
    for label, c in variants(cfg):
        s = summaries[label] = {"curate": curate.run(c)}
        say(f"[{label}] curate: {_line(s['curate'], 'kept_rows', 'questions_with_kept', 'train_questions')}")
        s["train"] = train.run(c)
        say(f"[{label}] train: {_line(s['train'], 'steps', 'selected_step', 'val_accuracy', 'wall_s')}")
        s["eval"] = evaluate.run(c)
        say(f"[{label}] eval: {_line(s['eval'], 'accuracy', 'n')}")
    summaries["report"] = report.run_report(run_root(cfg), cfg)
    summaries["wall_s"] = round(time.time() - t0, 1)
    return summaries


def _line(summary: dict, *keys: str) -> str:
    parts = [f"{k} {_fmt(summary.get(k))}" for k in keys if summary.get(k) is not None]
    return ", ".join(parts) + (" (reused)" if summary.get("reused") else "")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "/".join(f"{k} {x}" for k, x in v.items())
    return str(v)
