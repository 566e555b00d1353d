"""Teach stage: the paper's two-step zero-shot-CoT for every problem, D_max samples each.

    ftcot teach --config quickstart teacher.base_url=https://api.openai.com/v1 teacher.model=... \\
        teacher.api_key_env=OPENAI_API_KEY teacher.samples=8 teacher.temperature=0.7
    ftcot teach --dry-run [teacher.pilot=5]     # requests, tokens and dollars before any paid call
    ftcot teach ... teacher.mode=batch          # the OpenAI Batch API, at its price
    ftcot teach --migrate-cache                 # a per-answer cache from before 2026-12 into blocks
    ftcot teach import --from reasoning-teacher D_multiarith.json --out DIR [--split multiarith__default.json]

The recipe: make the answer store whole (an old per-answer cache migrated, the journals of killed
workers turned into blocks on every node), index it, project what the run will send, then stream
the questions through the Ray Data fan-out (teacher/fanout.py) and write the completions as Parquet
shards as blocks finish. Without `teacher.base_url` it starts the local teacher-sim (`teacher.sim`).
Every answer is stored at once (`teacher.cache_dir`, default <run_dir>/teacher_cache), so a killed
run resumes where it stopped, asking again only what was on the wire. A finished stage is reused;
`--retry-errors` re-asks only the rows that ended with an error, and a run stopped by
`teacher.budget_usd` continues when it is raised. The summary puts the projection made before the
first request next to what the run then sent and spent.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from .. import logs
from ..artifacts import is_complete, open_stage, require, stage_dir
from ..config import Config
from ..errors import DataError
from ..dataplane import user_errors
from ..tables import is_sharded, iter_table, locate, read_dataset, sharded_entry
from ..teacher import projection
from ..teacher.answers import AnswerStore

STAGE = "teach"
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
    from .. import storage
    from ..artifacts import run_root

    # A URI when the run folder is remote: every fan-out worker, on any node, reads and writes answers there.
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
    start = time.time()
    store = AnswerStore(cache_dir(cfg))
    if t.mode == "sync":
        from ..ray_utils import init_ray

        init_ray(cfg)  # inside the timing: Ray start-up is part of what a user waits for
    resent = make_store_whole(store, ray_nodes=t.mode == "sync")
    with teacher_endpoint(cfg) as ep:
        if t.mode == "batch":
            stats, projected = ask_in_batches(cfg, st, store, ep)
        else:
            stats, projected = ask_with_ray_data(cfg, st, store, ep, progress)
    entry = sharded_entry(str(locate(st.target(), "completions")), "completions")
    expected = projected["rows"]
    if entry["rows"] != expected:
        raise RuntimeError(f"the teacher pipeline wrote {entry['rows']} rows for {expected}: refusing to mark a partial "
                           "table done")
    st.tables["completions"] = entry
    summary = make_summary(cfg, stats, time.time() - start, ep["label"])
    summary["resent_after_interrupt"] = len(resent)
    summary["projected"] = projected
    summary["actual"] = projection.actual(stats, t)
    st.finish(summary, OUTPUTS)
    if summary["budget_stopped"]:
        print(f"ftcot teach: stopped sending before teacher.budget_usd={t.budget_usd} would be exceeded: "
              f"{summary['budget_unsent']} rows not asked (error 'budget: ...'); raise the budget and re-run "
              f"the same command to continue (answered rows come from the cache)", file=sys.stderr)
    return summary


# --------------------------------------------------------------------------- the answer store


def make_store_whole(store: AnswerStore, ray_nodes: bool) -> set[str]:
    """Migrate a per-answer cache, and turn the journals of killed workers into blocks (on every node of
    the Ray cluster, where each keeps its own journals). Returns the keys those workers had on the wire."""
    store.migrate_legacy(say=logs.say)
    if not ray_nodes:
        return store.recover_orphans()["on_wire"]
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    recover = ray.remote(num_cpus=0)(_recover)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:  # this machine only (a laptop): no task needed
        return _recover(store.root)
    refs = [recover.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(store.root)
            for n in nodes]
    return set().union(*ray.get(refs)) if refs else set()


def _recover(root: str) -> set[str]:
    return AnswerStore(root).recover_orphans()["on_wire"]


def index_ref(store: AnswerStore, on_driver: bool):
    """The store's index in the object store, for every worker to share: built here for a small run,
    in a Ray task otherwise (None when the store holds nothing yet)."""
    import ray

    if not store.block_names():
        return None
    if on_driver:
        return ray.put(store.build_index())
    return ray.remote(num_cpus=0)(_build_index).remote(store.root)


def _build_index(root: str):
    return AnswerStore(root).build_index()


# --------------------------------------------------------------------------- asking


def questions_of(cfg: Config, st):
    """The problems to ask about: a Ray Dataset streamed from the data stage's shards, or, for a small
    JSONL table (the paper's benchmarks, the synthetic tasks), the list itself (it fits by construction,
    and saves a Ray Data read)."""
    splits = set(cfg.teacher.splits)
    columns = ("sample_index", "question", "answer", "split")
    if is_sharded(locate(st.input, "problems")):
        return read_dataset(st.input, "problems", columns=columns).filter(lambda r: r["split"] in splits)
    return [{k: r[k] for k in columns} for batch in iter_table(st.input, "problems", columns) for r in batch
            if r["split"] in splits]


def ask_with_ray_data(cfg: Config, st, store: AnswerStore, ep: dict, progress: bool) -> tuple[dict, dict]:
    """The Ray Data fan-out: project (a pass over the questions), then ask and write the shards."""
    import ray

    from ..tables import write_dataset
    from ..teacher.fanout import fan_out, progress_bar, start_gate

    t = cfg.teacher
    questions = questions_of(cfg, st)
    small = isinstance(questions, list)
    index = index_ref(store, on_driver=small)
    if small:
        tallies = local_tally([questions], t, ep["endpoint_id"], ray.get(index) if index is not None else None)
        questions = ray.data.from_items(questions, override_num_blocks=1)  # cut into tasks by the fan-out
    else:
        with user_errors():
            tallies = projection.tally(questions, t, ep["endpoint_id"], index, [t.samples])
    projected = projection.project(tallies, t)["by_D"][-1] | {"tokenizer": projection.token_counter(t).label}
    if tallies["n"] == 0:
        raise DataError(f"{st.input}: no problems in teacher.splits={t.splits}")
    gate = start_gate(t, spent_usd=projected["cached_usd"])
    run = uuid.uuid4().hex[:12]
    ds, plan = fan_out(questions, t, gate=gate, index_ref=index, base_url=ep["base_url"], endpoint_id=ep["endpoint_id"],
                       secret=ep["secret"], cache_dir=store.root, n_questions=tallies["n"],
                       longest_question=tallies["longest"], run=run)
    bar = progress_bar(gate, projected["rows"], progress)
    try:
        with user_errors():
            write_dataset(ds, st.target(), "completions", expected_rows=projected["rows"])
    finally:
        if bar is not None:
            bar.close()
    stats = ray.get(gate.stats.remote()) | {"plan": plan}
    ray.kill(gate)
    # What a worker had not written as a block yet (its journal, on this node), once the pool's actors let go.
    store.recover_orphans(wait_for=run, timeout_s=30)
    return stats, projected


def ask_in_batches(cfg: Config, st, store: AnswerStore, ep: dict) -> tuple[dict, dict]:
    """The Batch API from the driver: questions streamed in chunks, a shard written per chunk."""
    from ..tables import write_shard
    from ..teacher.batch import run_batches

    t = cfg.teacher
    splits = set(t.splits)
    index = store.build_index()
    per_chunk = max(1, t.batch_max_lines // t.samples)

    def chunks() -> Iterator[list[dict]]:
        for batch in iter_table(st.input, "problems", batch_rows=per_chunk):
            chosen = [{k: r[k] for k in ("sample_index", "split", "question", "answer")} for r in batch
                      if r["split"] in splits]
            if chosen:
                yield chosen

    tallies = local_tally(chunks(), t, ep["endpoint_id"], index)
    projected = projection.project(tallies, t)["by_D"][-1] | {"tokenizer": projection.token_counter(t).label}
    written = {"shards": 0}

    def write(rows: list[dict]) -> None:
        write_shard(st.target(), "completions", rows, written["shards"])
        written["shards"] += 1

    stats = run_batches(chunks, write, t, base_url=ep["base_url"], endpoint_id=ep["endpoint_id"], secret=ep["secret"],
                        cache_dir=store.root, spent_usd=projected["cached_usd"], longest_question=tallies["longest"],
                        say=logs.say)
    return stats, projected


def local_tally(chunks: Iterator[list[dict]], tcfg, endpoint_id: str, index, diversities: Optional[list[int]] = None) -> dict:
    """`projection.tally` on the driver, chunk by chunk (batch mode and the pilot: no Ray needed)."""
    from ..teacher.spec import RequestSpec

    ds = diversities or [tcfg.samples]
    spec, counter = RequestSpec.of(tcfg, endpoint_id), projection.token_counter(tcfg)
    n, longest, parts = 0, 0, {d: [] for d in ds}
    for chunk in chunks:
        qs = [q["question"] for q in chunk]
        n += len(qs)
        longest = max([longest, *map(len, qs)])
        for d in ds:
            parts[d].append(projection.tally_questions(qs, spec, d, index, counter))
    return {"n": n, "longest": longest, "by_D": {d: projection.add_tallies(p) for d, p in parts.items()}}


def make_summary(cfg: Config, stats: dict, wall_s: float, label: str) -> dict:
    t = cfg.teacher
    rows = stats.get("rows_done", 0) + stats.get("rows_error", 0)
    unsent = int(stats.get("rows_budget_unsent", 0))
    requests = stats.get("requests", 0)
    summary = {
        "endpoint": label, "api": t.api, "model": t.model, "mode": t.mode, "temperature": t.temperature,
        "questions": stats.get("questions", 0) or (rows // max(1, t.samples)), "samples": t.samples, "rows": rows,
        "ok": stats.get("rows_done", 0), "errors": stats.get("rows_error", 0),
        "cache_hits": stats.get("cache_hits", 0),
        "requests": requests, "failed_requests": stats.get("failed_requests", 0), "retries": stats.get("retries", 0),
        "prompt_tokens": stats.get("prompt_tokens", 0), "completion_tokens": stats.get("completion_tokens", 0),
        "cost_usd": round(stats.get("cost_usd", 0.0), 6),  # spent by this run
        "table_cost_usd": round(stats.get("rows_cost_usd", 0.0), 6),  # what the whole table cost
        "truncated": int(stats.get("rows_truncated", 0)),
        "wall_s": round(wall_s, 2), "requests_per_s": round(requests / wall_s, 2) if wall_s > 0 else 0.0,
        "budget_usd": t.budget_usd, "budget_stopped": unsent > 0, "budget_unsent": unsent,
    }
    if t.mode == "batch":
        summary |= {k: stats.get(k, 0) for k in ("batches", "batches_resumed", "failed_batches", "http_calls")}
    elif stats.get("plan"):
        summary["fan_out"] = stats["plan"]
    return summary


# --------------------------------------------------------------------------- before any paid call


def problem_batches(cfg: Config, inp: Path | str | None = None) -> Callable[[], Iterator[list[dict]]]:
    """The problems the stage will read, streamed in batches (callable again for each pass): the data
    stage's table; a benchmark or synthetic task not built yet is built in memory (well under a second,
    nothing written); your own data not read yet runs the data stage first (nothing is sent to a teacher)."""
    from ..tasks.custom import is_custom

    if inp is None and not is_complete(stage_dir(cfg, "data")) and not is_custom(cfg.data):
        from .data import build

        rows = build(cfg)[0]
        return lambda: iter([rows])
    if inp is None and not is_complete(stage_dir(cfg, "data")):
        from .data import run as run_data

        run_data(cfg)
    folder = require(inp if inp is not None else stage_dir(cfg, "data"), "data")
    return lambda: iter_table(folder, "problems", batch_rows=4096)


def diversities(cfg: Config) -> list[int]:
    """D_max and each D the run curates."""
    return sorted({*cfg.pipeline.diversity, cfg.curate.diversity, cfg.teacher.samples})


def project(cfg: Config, inp: Path | str | None = None, *, pilot: bool = True) -> dict:
    """`ftcot teach --dry-run`: the projection (with `teacher.pilot=N`, after N questions answered for real)."""
    t = cfg.teacher
    batches = problem_batches(cfg, inp)
    store = AnswerStore(cache_dir(cfg))
    store.migrate_legacy(say=logs.say)
    splits = set(t.splits)

    def chunks() -> Iterator[list[dict]]:
        for batch in batches():
            yield [r for r in batch if r["split"] in splits]

    pilot_summary = None
    if pilot and t.pilot:
        with teacher_endpoint(cfg) as ep:
            pilot_summary = run_pilot(cfg, chunks(), ep, store)
    out = projection.project(local_tally(chunks(), t, endpoint_id(cfg), store.build_index(), diversities(cfg)), t)
    if pilot_summary:
        out["pilot"] = pilot_summary
    return out


def run_pilot(cfg: Config, chunks: Iterator[list[dict]], ep: dict, store: AnswerStore) -> dict:
    """`teacher.pilot` questions, the first of the work list not answered yet, answered for real
    (synchronously, on the driver) and stored: the run will not ask them again."""
    from ..endpoint import run_sync
    from ..teacher.client import TeacherClient
    from ..teacher.fanout import answer_questions, request_ceilings
    from ..teacher.limiter import JobGate, Permits
    from ..teacher.spec import RequestSpec

    t = cfg.teacher
    index = store.build_index()
    spec = RequestSpec.of(t, ep["endpoint_id"])
    chosen: list[dict] = []
    for chunk in chunks:
        for q in chunk:
            if not index.get_many([spec.step1_key(q["question"], 0)]):
                chosen.append({k: q[k] for k in ("sample_index", "split", "question", "answer")})
            if len(chosen) >= t.pilot:
                break
        if len(chosen) >= t.pilot:
            break
    if not chosen:
        return {"questions": 0, "rows": 0, "cost_usd": 0.0, "errors": 0}
    _, cost_each = request_ceilings(max(len(q["question"]) for q in chosen), t)
    gate = JobGate(budget_usd=t.budget_usd)
    permits = Permits(gate, t.budget_usd is not None, cost_each, local=True)
    pilot_cfg = t.model_copy(update={"mode": "sync"})  # a pilot is a few synchronous requests, at their price
    log = store.log(t.cache_block_rows, t.cache_flush_s)

    async def go() -> list[dict]:
        client = TeacherClient(pilot_cfg, base_url=ep["base_url"], endpoint_id=ep["endpoint_id"], secret=ep["secret"],
                               permits=permits, index=index, log=log, concurrency=min(t.concurrency, 32))
        try:
            return await answer_questions(client, pilot_cfg, chosen)
        finally:
            await client.close()

    try:
        answered = run_sync(go)
    finally:
        log.close()
    return {"questions": len(chosen), "rows": len(answered), "cost_usd": round(sum(r["cost_usd"] for r in answered), 6),
            "errors": sum(1 for r in answered if r["error"]),
            "note": "answered synchronously and stored: the run will not ask them again"}


def projection_text(p: dict, summary: Optional[dict] = None) -> str:
    return projection.format_projection(p, summary.get("actual") if summary else None)


def migrate(cfg: Config) -> dict:
    """`ftcot teach --migrate-cache`: move a per-answer cache (before 2026-12) into blocks, once."""
    store = AnswerStore(cache_dir(cfg))
    moved = store.migrate_legacy(say=logs.say)
    return {"cache_dir": store.root, "migrated_answers": moved, "blocks": len(store.block_names())}
