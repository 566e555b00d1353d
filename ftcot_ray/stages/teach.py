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

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

from ..artifacts import MANIFEST, begin, finish, is_complete, read_manifest, require, stage_dir
from ..cli import add_config_arguments, config_from_args, print_summary
from ..config import Config
from ..io import InputFileError, read_jsonl, write_jsonl
from ..teacher.fanout import COMPLETION_COLUMNS, cached_row, expand_rows, fan_out, format_figures

STAGE = "teach"
INPUT_COLUMNS = {"problems": ["sample_index", "question", "answer", "split"]}
OUTPUT_COLUMNS = {"completions": COMPLETION_COLUMNS}


@contextlib.contextmanager
def teacher_endpoint(cfg: Config) -> Iterator[dict]:
    """{"base_url", "endpoint_id", "secret", "label"}: the configured API (checked by one preflight
    call) or a local teacher-sim started for this run."""
    from ..teacher.client import Secret, api_key_from_env, preflight
    from ..teacher.sim import SimSettings, running_sim

    t = cfg.teacher
    if t.budget_usd is not None and t.model not in t.prices:
        raise ValueError(f"teacher.budget_usd is set but teacher.prices has no entry for model {t.model!r}: "
                         f"add teacher.prices.{t.model}.input / .output (USD per 1M tokens)")
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


def load_problems(inp: Path, splits: list[str]) -> list[dict]:
    path = inp / "problems.jsonl"
    problems = read_jsonl(path)
    for i, p in enumerate(problems, 1):
        missing = [c for c in INPUT_COLUMNS["problems"] if c not in p]
        if missing:
            raise InputFileError(f"{path}:{i}: missing column(s) {', '.join(missing)}")
    return [p for p in problems if p["split"] in splits]


def should_rerun(cfg: Config, summary: dict, retry_errors: bool) -> bool:
    """A finished stage is re-opened only to retry its error rows, or after raising a budget that stopped it."""
    if retry_errors and summary.get("errors", 0) > 0:
        return True
    budget = cfg.teacher.budget_usd
    return bool(summary.get("budget_stopped")) and (budget is None or budget > (summary.get("budget_usd") or 0))


def run(cfg: Config, out: Path | None = None, inp: Path | None = None, *, retry_errors: bool = False,
        progress: bool = True) -> dict:
    out = Path(out) if out else stage_dir(cfg, STAGE)
    if is_complete(out):
        summary = read_manifest(out)["summary"]
        if not should_rerun(cfg, summary, retry_errors):
            return summary | {"reused": True}
        (out / MANIFEST).unlink()  # re-open: answered rows come back from the cache, free
    inp = require(inp or stage_dir(cfg, "data"), "data")
    t = cfg.teacher
    rows = expand_rows(load_problems(inp, t.splits), t.samples)
    begin(out)
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
    write_jsonl(out / "completions.jsonl", done)
    summary = make_summary(cfg, done, stats, time.time() - start, ep["label"])
    finish(out, cfg, STAGE, inputs={"problems": INPUT_COLUMNS["problems"]}, outputs=OUTPUT_COLUMNS,
           summary=summary, key=out.name)
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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="output folder (default: <run_dir>/teach/<key>)")
    parser.add_argument("--in", dest="inp", help="data-stage folder (default: the config's)")
    parser.add_argument("--retry-errors", action="store_true", help="re-ask the rows of a finished run that ended with an error")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    # nargs="+": the file follows `--from SOURCE` on the command line (`import` itself lands in the
    # overrides positional, which argparse has already closed by then).
    parser.add_argument("--from", dest="source", nargs="+", default=None, metavar="SOURCE FILE",
                        help="`ftcot teach import --from reasoning-teacher D_<key>.json --out DIR`: import released completions")
    parser.add_argument("--split", default=None, help="import: the paper's split file (<key>__default.json)")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if overrides[:1] == ["import"]:
        return _import(args, overrides[1:])
    cfg = config_from_args(args)
    summary = run(cfg, args.out, args.inp, retry_errors=args.retry_errors, progress=not args.no_progress)
    if not summary.get("reused"):
        print(f"teacher: {summary['rows']} rows, {summary['ok']} ok, " + format_figures(
            {**summary, "rows_error": summary["errors"]}, summary["requests_per_s"]), file=sys.stderr)
    print_summary(summary)
    return 0


def _import(args: argparse.Namespace, rest: list[str]) -> int:
    from ..teacher.importer import SOURCES, import_reasoning_teacher

    source, files = (args.source[0], args.source[1:] + rest) if args.source else (None, rest)
    if source not in SOURCES:
        raise ValueError(f"teach import: --from must be one of {', '.join(SOURCES)} (got {source!r})")
    if len(files) != 1 or not args.out:
        raise ValueError("usage: ftcot teach import --from reasoning-teacher D_<key>.json --out DIR [--split FILE]")
    print_summary(import_reasoning_teacher(files[0], args.out, split_file=args.split))
    return 0
