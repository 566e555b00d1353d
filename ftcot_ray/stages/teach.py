"""Teach stage: the paper's two-step zero-shot-CoT for every problem, D_max samples each.

    ftcot teach --config quickstart teacher.base_url=https://api.openai.com/v1 teacher.model=... \\
        teacher.api_key_env=OPENAI_API_KEY teacher.samples=8 teacher.temperature=0.7
    ftcot teach import --from reasoning-teacher D_multiarith.json --out DIR [--split multiarith__default.json]

Without `teacher.base_url` it starts the local teacher-sim (`teacher.sim`). Every answered request
is cached at once (`teacher.cache_dir`, default <run_dir>/teacher_cache), so a killed run resumes
where it stopped; rows whose two steps are both cached are assembled here, without Ray or a request.
A finished stage is reused; `--retry-errors` re-asks only the rows that ended with an error, and a
run stopped by `teacher.budget_usd` continues when it is raised.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

from ..artifacts import open_stage
from ..config import Config
from ..teacher.fanout import cached_row, expand_rows, fan_out

STAGE = "teach"
INPUTS = ("problems",)
OUTPUTS = ("completions",)


@contextlib.contextmanager
def teacher_endpoint(cfg: Config) -> Iterator[dict]:
    """{"base_url", "endpoint_id", "secret", "label"}: the configured API (checked by one preflight
    call) or a local teacher-sim started for this run."""
    from ..teacher.client import Secret, api_key_from_env, preflight
    from ..teacher.sim import SimSettings, running_sim

    t = cfg.teacher
    if t.base_url is None:
        settings = SimSettings.from_config(t.sim, model=t.model)
        with running_sim(settings, subprocess_mode=True) as base_url:
            yield {"base_url": base_url, "endpoint_id": settings.endpoint_id(), "secret": Secret("sim"),
                   "label": f"teacher-sim ({settings.mode}, local)"}
        return
    secret = api_key_from_env(t.api_key_env, t.base_url)
    preflight(t.base_url, secret, t.api_key_env, timeout_s=min(t.timeout_s, 15.0))
    yield {"base_url": t.base_url, "endpoint_id": t.base_url.rstrip("/"), "secret": secret, "label": t.base_url}


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else Path(cfg.run_dir) / "teacher_cache"


def should_rerun(cfg: Config, summary: dict, retry_errors: bool) -> bool:
    """A finished stage is re-opened only to retry its error rows, or after raising a budget that stopped it."""
    if retry_errors and summary.get("errors", 0) > 0:
        return True
    budget = cfg.teacher.budget_usd
    return bool(summary.get("budget_stopped")) and (budget is None or budget > (summary.get("budget_usd") or 0))


def run(cfg: Config, out: Path | None = None, inp: Path | None = None, *, retry_errors: bool = False,
        progress: bool = True) -> dict:
    st = open_stage(cfg, STAGE, out, inp, reopen=lambda summary: should_rerun(cfg, summary, retry_errors))
    if st.reused:
        return st.summary
    t = cfg.teacher
    rows = expand_rows([p for p in st.read("problems") if p["split"] in t.splits], t.samples)
    start = time.time()
    with teacher_endpoint(cfg) as ep:
        done, todo = split_cached(rows, cfg, ep["endpoint_id"])
        stats = {}
        if todo:
            from ..ray_utils import init_ray

            init_ray(cfg)  # inside the timing: Ray start-up is part of what a user waits for
            answered, stats = fan_out(todo, t, base_url=ep["base_url"], endpoint_id=ep["endpoint_id"],
                                      secret=ep["secret"], cache_dir=str(cache_dir(cfg).resolve()),
                                      spent_usd=sum(r["cost_usd"] for r in done), cached=len(done),
                                      total=len(rows), progress=progress)
            done += answered
    done.sort(key=lambda r: (r["sample_index"], r["sample_idx"]))
    if len(done) != len(rows):
        raise RuntimeError(f"teacher fan-out returned {len(done)} rows for {len(rows)}: refusing to write a partial table")
    st.write("completions", done)
    summary = make_summary(cfg, done, stats, time.time() - start, ep["label"])
    st.finish(summary, OUTPUTS)
    if summary["budget_stopped"]:
        print(f"ftcot teach: stopped sending before teacher.budget_usd={t.budget_usd} would be exceeded: "
              f"{summary['budget_unsent']} rows not asked (error 'budget: ...'); raise the budget and re-run "
              f"the same command to continue (answered rows come from the cache)", file=sys.stderr)
    return summary


def split_cached(rows: list[dict], cfg: Config, endpoint_id: str) -> tuple[list[dict], list[dict]]:
    """(rows fully answered in the cache, rows still to ask)."""
    from ..teacher.cache import AnswerCache

    cache = AnswerCache(cache_dir(cfg))
    done, todo = [], []
    for r in rows:
        hit = cached_row(cache, cfg.teacher, endpoint_id, r)
        (done if hit is not None else todo).append(hit if hit is not None else r)
    return done, todo


def make_summary(cfg: Config, rows: list[dict], stats: dict, wall_s: float, label: str) -> dict:
    t = cfg.teacher
    errors = [r for r in rows if r["error"]]
    unsent = sum(1 for r in errors if "budget:" in r["error"])
    requests = stats.get("requests", 0)
    return {
        "endpoint": label, "api": t.api, "model": t.model, "temperature": t.temperature,
        "questions": len({r["sample_index"] for r in rows}), "samples": t.samples, "rows": len(rows),
        "ok": len(rows) - len(errors), "errors": len(errors),
        "cache_hits": stats.get("cache_hits", len(rows)),
        "requests": requests, "failed_requests": stats.get("failed_requests", 0), "retries": stats.get("retries", 0),
        "prompt_tokens": stats.get("prompt_tokens", 0), "completion_tokens": stats.get("completion_tokens", 0),
        "cost_usd": round(stats.get("cost_usd", 0.0), 6),  # spent by this run
        "table_cost_usd": round(sum(r["cost_usd"] or 0.0 for r in rows), 6),  # what the whole table cost
        "truncated": sum(1 for r in rows if r["finish_reason"] == "length"),
        "wall_s": round(wall_s, 2), "requests_per_s": round(requests / wall_s, 2) if wall_s > 0 else 0.0,
        "budget_usd": t.budget_usd, "budget_stopped": unsent > 0, "budget_unsent": unsent,
    }
