"""Teach stage: the paper's two-step zero-shot-CoT for every problem, D_max samples each.

    ftcot teach --config quickstart teacher.base_url=https://api.openai.com/v1 teacher.model=... \\
        teacher.api_key_env=OPENAI_API_KEY teacher.samples=8 teacher.temperature=0.7
    ftcot teach --dry-run [teacher.pilot=5]     # requests, tokens and dollars before any paid call
    ftcot teach ... teacher.mode=batch          # the OpenAI Batch API, at its price
    ftcot teach import --from reasoning-teacher D_multiarith.json --out DIR [--split multiarith__default.json]

Without `teacher.base_url` it starts the local teacher-sim (`teacher.sim`). Every answered request
is cached at once (`teacher.cache_dir`, default <run_dir>/teacher_cache), so a killed run resumes
where it stopped; rows whose two steps are both cached are assembled here, without Ray or a request.
A finished stage is reused; `--retry-errors` re-asks only the rows that ended with an error, and a
run stopped by `teacher.budget_usd` continues when it is raised. The summary puts the projection
made before the first request next to what the run then sent and spent.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from .. import logs
from ..artifacts import is_complete, open_stage, require, stage_dir
from ..config import Config
from ..schemas import read_table
from ..teacher import projection
from ..teacher.cache import AnswerCache
from ..teacher.fanout import cached_row, clear_journals, expand_rows, fan_out, resent_keys, take_journals

STAGE = "teach"
INPUTS = ("problems",)
OUTPUTS = ("completions",)


def endpoint_id(cfg: Config) -> str:
    """The cache identity of the configured teacher (known without starting anything)."""
    from ..teacher.sim import sim_endpoint_id

    t = cfg.teacher
    return sim_endpoint_id(t.sim, t.model) if t.base_url is None else t.base_url.rstrip("/")


@contextlib.contextmanager
def teacher_endpoint(cfg: Config) -> Iterator[dict]:
    """{"base_url", "endpoint_id", "secret", "label"}: the configured API (checked by one preflight
    call) or a local teacher-sim started for this run (in its own process: the reaper takes it
    down with the run)."""
    from ..teacher.client import Secret, api_key_from_env, preflight
    from ..teacher.sim import running_sim

    t = cfg.teacher
    if t.base_url is None:
        key = os.environ.get(t.sim.require_key_env, "") if t.sim.require_key_env else "sim"
        with running_sim(t.sim, model=t.model, subprocess_mode=True) as base_url:
            yield {"base_url": base_url, "endpoint_id": endpoint_id(cfg), "secret": Secret(key),
                   "label": f"teacher-sim ({t.sim.mode}, local)"}
        return
    secret = api_key_from_env(t.api_key_env, t.base_url)
    preflight(t.base_url, secret, t.api_key_env, timeout_s=min(t.timeout_s, 15.0))
    yield {"base_url": t.base_url, "endpoint_id": endpoint_id(cfg), "secret": secret, "label": t.base_url}


def cache_dir(cfg: Config) -> str:
    from ..artifacts import run_root

    from .. import storage

    # A URI when the run folder is remote: every fan-out actor, on any node, reads and writes answers there.
    if cfg.teacher.cache_dir:
        return cfg.teacher.cache_dir if storage.is_uri(cfg.teacher.cache_dir) else str(Path(cfg.teacher.cache_dir).resolve())
    if storage.is_uri(cfg.run_dir):
        return storage.join(cfg.run_dir, "teacher_cache")
    return str((run_root(cfg) / "teacher_cache").resolve())


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
    cache = AnswerCache(cache_dir(cfg))
    on_the_wire = resent_keys(cache, take_journals(cache.root))  # asked by a run that was killed mid-request
    start = time.time()
    with teacher_endpoint(cfg) as ep:
        projected = projection.project(rows, t, ep["endpoint_id"], cache, [t.samples])
        done, todo = split_cached(rows, cfg, ep["endpoint_id"])
        stats = {}
        if todo:
            answered, stats = ask(cfg, todo, ep, spent_usd=sum(r["cost_usd"] for r in done), cached=len(done),
                                  total=len(rows), progress=progress)
            done += answered
    done.sort(key=lambda r: (r["sample_index"], r["sample_idx"]))
    if len(done) != len(rows):
        raise RuntimeError(f"teacher fan-out returned {len(done)} rows for {len(rows)}: refusing to write a partial table")
    st.write("completions", done)
    summary = make_summary(cfg, done, stats, time.time() - start, ep["label"])
    summary["resent_after_interrupt"] = len(on_the_wire)
    summary["projected"] = projected["by_D"][-1] | {"tokenizer": projected["tokenizer"]}
    summary["actual"] = projection.actual(stats, t)
    st.finish(summary, OUTPUTS)
    clear_journals(cache.root)  # this run's own: every request it sent is answered or an error row
    if summary["budget_stopped"]:
        print(f"ftcot teach: stopped sending before teacher.budget_usd={t.budget_usd} would be exceeded: "
              f"{summary['budget_unsent']} rows not asked (error 'budget: ...'); raise the budget and re-run "
              f"the same command to continue (answered rows come from the cache)", file=sys.stderr)
    return summary


def ask(cfg: Config, todo: list[dict], ep: dict, *, spent_usd: float, cached: int, total: int,
        progress: bool) -> tuple[list[dict], dict]:
    """The rows not in the cache, through the Batch API or the fan-out on Ray actors."""
    t = cfg.teacher
    common = dict(base_url=ep["base_url"], endpoint_id=ep["endpoint_id"], secret=ep["secret"],
                  cache_dir=cache_dir(cfg), spent_usd=spent_usd)
    if t.mode == "batch":
        from ..teacher.batch import run_batches

        answered, stats = run_batches(todo, t, say=logs.say, **common)
        return answered, stats | {"cache_hits": cached}
    from ..ray_utils import init_ray

    init_ray(cfg)  # inside the timing: Ray start-up is part of what a user waits for
    return fan_out(todo, t, cached=cached, total=total, progress=progress, **common)


def split_cached(rows: list[dict], cfg: Config, endpoint_id: str) -> tuple[list[dict], list[dict]]:
    """(rows fully answered in the cache, rows still to ask)."""
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
    summary = {
        "endpoint": label, "api": t.api, "model": t.model, "mode": t.mode, "temperature": t.temperature,
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
    if t.mode == "batch":
        summary |= {k: stats.get(k, 0) for k in ("batches", "batches_resumed", "failed_batches", "http_calls")}
    elif stats.get("plan"):
        summary["fan_out"] = stats["plan"]
    return summary


# --------------------------------------------------------------------------- before any paid call


def plan_problems(cfg: Config, inp: Path | str | None = None) -> list[dict]:
    """The problems the stage will read: the data stage's table, else built in memory (< 1 s)."""
    if inp is not None:
        return read_table(require(inp, "data"), "problems")
    src = stage_dir(cfg, "data")
    if is_complete(src):
        return read_table(src, "problems")
    from .data import build

    return build(cfg)[0]


def diversities(cfg: Config) -> list[int]:
    """D_max and each D the run curates."""
    return sorted({*cfg.pipeline.diversity, cfg.curate.diversity, cfg.teacher.samples})


def project(cfg: Config, inp: Path | str | None = None, *, pilot: bool = True) -> dict:
    """`ftcot teach --dry-run`: the projection (with `teacher.pilot=N`, after N questions answered for real)."""
    t = cfg.teacher
    rows = expand_rows([p for p in plan_problems(cfg, inp) if p["split"] in t.splits], t.samples)
    cache = AnswerCache(cache_dir(cfg))
    pilot_summary = None
    if pilot and t.pilot:
        with teacher_endpoint(cfg) as ep:
            pilot_summary = run_pilot(cfg, rows, ep, cache)
    out = projection.project(rows, t, endpoint_id(cfg), cache, diversities(cfg))
    if pilot_summary:
        out["pilot"] = pilot_summary
    return out


def run_pilot(cfg: Config, rows: list[dict], ep: dict, cache: AnswerCache) -> dict:
    """`teacher.pilot` questions, spread over the work list, answered for real (synchronously) and cached."""
    from ..endpoint import run_sync
    from ..teacher.client import TeacherClient
    from ..teacher.fanout import answer_rows, request_ceilings
    from ..teacher.limiter import JobGate, Permits

    t = cfg.teacher
    done, todo = split_cached(rows, cfg, ep["endpoint_id"])
    questions = sorted({r["sample_index"] for r in todo})
    step = max(1, len(questions) // max(1, t.pilot))
    chosen = set(questions[::step][: t.pilot])
    pilot_rows = [r for r in todo if r["sample_index"] in chosen]
    if not pilot_rows:
        return {"questions": 0, "rows": 0, "cost_usd": 0.0, "errors": 0}
    tokens_each, cost_each = request_ceilings(pilot_rows, t)
    gated = t.budget_usd is not None
    gate = JobGate(budget_usd=t.budget_usd, spent_usd=sum(r["cost_usd"] for r in done))
    permits = Permits(gate, gated, tokens_each, cost_each, local=True)
    pilot_cfg = t.model_copy(update={"mode": "sync"})  # a pilot is a few synchronous requests, at their price

    async def go() -> list[dict]:
        client = TeacherClient(pilot_cfg, base_url=ep["base_url"], endpoint_id=ep["endpoint_id"], secret=ep["secret"],
                               cache=cache, permits=permits, concurrency=min(t.concurrency, 32))
        try:
            return await answer_rows(client, pilot_cfg, pilot_rows)
        finally:
            await client.close()

    answered = run_sync(go)
    return {"questions": len(chosen), "rows": len(answered), "cost_usd": round(sum(r["cost_usd"] for r in answered), 6),
            "errors": sum(1 for r in answered if r["error"]),
            "note": "answered synchronously and cached: the run will not ask them again"}


def projection_text(p: dict, summary: Optional[dict] = None) -> str:
    return projection.format_projection(p, summary.get("actual") if summary else None)
