"""The teacher fan-out: problems x D samples -> completions rows, on Ray actors.

What happens to one question (plain async functions, testable without Ray): step 1 asks for the
rationales of its samples (one `n`-request or one request per sample), step 2 asks each rationale
for its answer. Where it runs: async Ray actors sized to the CPUs Ray has (`teacher.num_actors`),
fed chunks of rows by the driver; the job's `teacher.concurrency` requests in flight are split
evenly over the actors, each keeping its share on one event loop with one pooled HTTP client
(ftcot_ray/endpoint.py). Every actor shares ONE gate actor (rate limits, budget, counters). The
driver shows a live bar fed from the gate's counters. Rows travel as JSON strings.

`teacher.batch_size` is only the rows per chunk: each actor holds as many chunks at once as it
takes to keep its share of requests in flight (`actor_plan`), so the chunk size never changes
the concurrency, and the concurrency never changes the chunk size.

Every request's cache keys are appended to a journal (`<cache_dir>/inflight/`) before it is sent:
after a kill, the next run counts the keys that were on the wire and are not in the cache (asked
again, perhaps paid twice) and says so in its summary.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from ..prompts import answer_prompt, chat_messages, reasoning_prompt
from .cache import AnswerCache, request_key
from .client import Secret, StepResult, TeacherClient
from .limiter import Permits, limiter_actor_class

ROW_BASE = ("sample_index", "sample_idx", "split", "question", "answer")


def expand_rows(problems: list[dict], samples: int) -> list[dict]:
    """One row per (problem, sample_idx): the work list of the fan-out."""
    return [{k: p[k] for k in ROW_BASE if k != "sample_idx"} | {"sample_idx": i}
            for p in problems for i in range(samples)]


def payloads(api: str, question: str, rationale: Optional[str] = None) -> Any:
    """Step 1 (rationale None) or step 2 request body: a completions prompt or the two-turn chat."""
    if api == "chat":
        return chat_messages(question, rationale)
    return reasoning_prompt(question) if rationale is None else answer_prompt(question, rationale)


def finish_row(row: dict, tcfg: Any, s1: StepResult, s2: Optional[StepResult]) -> dict:
    """A completions-table row from the two steps (s2 None when step 1 failed)."""
    q = row["question"]
    steps = [s for s in (s1, s2) if s is not None]
    rationale = s1.text if s1.error is None else None
    return {
        **{k: row[k] for k in ROW_BASE},
        "reasoning_prompt": reasoning_prompt(q),
        "rationale": rationale,
        "answer_prompt": answer_prompt(q, rationale) if rationale is not None else None,
        "answer_completion": s2.text if s2 is not None and s2.error is None else None,
        # The rationale's finish reason: "length" marks a rationale cut by max_tokens (curation drops those).
        "finish_reason": s1.finish_reason,
        "prompt_tokens": sum(s.prompt_tokens for s in steps),
        "completion_tokens": sum(s.completion_tokens for s in steps),
        "cost_usd": sum(s.cost_usd for s in steps),
        "model": tcfg.model,
        "temperature": tcfg.temperature,
        "error": next((f"step {i}: {s.error}" for i, s in enumerate(steps, 1) if s.error), None),
        "attempts": sum(s.attempts for s in steps),
    }


async def answer_question(client: TeacherClient, tcfg: Any, rows: list[dict]) -> list[dict]:
    """All requested samples of one question: step 1, then step 2 on each rationale.

    Each sample goes on to its step 2 as soon as its own step 1 is back (with `use_n`, one request
    brings all rationales at once): waiting for siblings would hold budget and slots for nothing.
    """
    q = rows[0]["question"]

    async def second(row: dict, s1: StepResult) -> dict:
        if s1.error is not None:
            return finish_row(row, tcfg, s1, None)  # (a failed step 1 released its reservation already)
        # A rationale asked for in this run prepaid its answer's budget (see `Permits`).
        res = await client.step(payloads(tcfg.api, q, s1.text), [row["sample_idx"]], tcfg.answer_max_tokens,
                                first_step=False, prepaid=not s1.cached)
        return finish_row(row, tcfg, s1, res[row["sample_idx"]])

    async def whole(row: dict) -> dict:
        first = await client.step(payloads(tcfg.api, q), [row["sample_idx"]], tcfg.max_tokens)
        return await second(row, first[row["sample_idx"]])

    if tcfg.use_n and len(rows) > 1:
        first = await client.step(payloads(tcfg.api, q), [r["sample_idx"] for r in rows], tcfg.max_tokens)
        out = await asyncio.gather(*(second(r, first[r["sample_idx"]]) for r in rows))
    else:
        out = await asyncio.gather(*(whole(r) for r in rows))
    for r in out:
        client.delta["rows_error" if r["error"] else "rows_done"] += 1
    return list(out)


async def answer_rows(client: TeacherClient, tcfg: Any, rows: list[dict]) -> list[dict]:
    by_question: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_question[r["sample_index"]].append(r)
    groups = await asyncio.gather(*(answer_question(client, tcfg, g) for g in by_question.values()))
    return [r for g in groups for r in g]


# --------------------------------------------------------------------------- the cache, from the driver


def cached_row(cache: AnswerCache, tcfg: Any, endpoint_id: str, row: dict) -> Optional[dict]:
    """The finished row if both steps of this sample are cached (a re-run sends nothing for it)."""
    def get(payload: Any, max_tokens: int) -> Optional[StepResult]:
        params = {"temperature": tcfg.temperature, "top_p": tcfg.top_p, "max_tokens": max_tokens}
        hit = cache.get(request_key(endpoint_id, tcfg.api, tcfg.model, payload, params, row["sample_idx"]))
        return StepResult.from_cache(hit) if hit is not None else None

    s1 = get(payloads(tcfg.api, row["question"]), tcfg.max_tokens)
    if s1 is None:
        return None
    s2 = get(payloads(tcfg.api, row["question"], s1.text), tcfg.answer_max_tokens)
    return finish_row(row, tcfg, s1, s2) if s2 is not None else None


# --------------------------------------------------------------------------- Ray wiring


class TeacherWorker:
    """One fan-out actor: one pooled endpoint client on the actor's event loop, shared by all its chunks."""

    def __init__(self, spec: dict, secret: Secret, gate: Any):
        from ..config import TeacherConfig

        self.spec, self.secret, self.gate = spec, secret, gate
        self.t = TeacherConfig.model_validate(spec["teacher"])
        self.client: Optional[TeacherClient] = None

    def _ensure(self) -> TeacherClient:
        if self.client is None:  # created on the actor's event loop, at the first chunk
            permits = Permits(self.gate, self.spec["gated"], self.spec["tokens_each"], self.spec["cost_each"])
            journal = open_journal(self.spec["journal_dir"])
            self.client = TeacherClient(self.t, base_url=self.spec["base_url"], endpoint_id=self.spec["endpoint_id"],
                                        secret=self.secret, cache=AnswerCache(self.spec["cache_dir"]), permits=permits,
                                        concurrency=self.spec["per_actor"], journal=journal)
            asyncio.ensure_future(self._flush_loop())
        return self.client

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.client.permits.flush()
            except Exception:  # progress is best effort; the chunk-end flush is awaited
                pass

    async def ready(self) -> bool:
        return True

    async def answer(self, rows_json: list[str]) -> list[str]:
        client = self._ensure()
        out = await answer_rows(client, self.t, [json.loads(x) for x in rows_json])
        await client.permits.flush()
        return [json.dumps(r, ensure_ascii=False) for r in out]


# --------------------------------------------------------------------------- the in-flight journal


def journal_dir(cache_dir: str | Path) -> Path:
    """Beside the cache (for a cache on object storage: in its local mirror, on the driver's disk)."""
    from ..storage import local_side

    return local_side(cache_dir) / "inflight"


def open_journal(folder: str | Path):
    """An append-only file of the cache keys this worker sends (line-buffered: one write per request)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return open(path / f"{uuid.uuid4().hex}.keys", "a", buffering=1, encoding="utf-8")


def take_journals(cache_dir: str | Path) -> set[str]:
    """Keys earlier runs had on the wire (the journals are then removed: this run writes its own).

    Two runs sharing one cache at the same moment would miscount this figure (never the cache)."""
    keys: set[str] = set()
    for f in sorted(journal_dir(cache_dir).glob("*.keys")):
        try:
            keys.update(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            f.unlink()
        except OSError:
            pass
    return keys


def clear_journals(cache_dir: str | Path) -> None:
    take_journals(cache_dir)


def resent_keys(cache: AnswerCache, journaled: set[str]) -> set[str]:
    """Journaled keys with no cached answer: sent by an interrupted run, to be asked again."""
    return {k for k in journaled if cache.get(k) is None}


# --------------------------------------------------------------------------- sizing


def actor_plan(tcfg: Any, n_rows: int, cpus: float) -> dict:
    """How the fan-out runs: actors, requests in flight each, rows per chunk, chunks in flight each.

    Actors: `teacher.num_actors`, else one per 512 requests in flight, at most one per CPU Ray has:
    one actor's event loop sends over 1,000 req/s on one core here (about 0.3 ms of CPU a request),
    and on two shared cores a second actor at 256 in flight only added start-up time. Each actor
    holds chunks of `teacher.batch_size` rows, enough of them at once for twice its share of
    requests in flight: a chunk's slowest rows never leave slots idle.
    """
    actors = tcfg.num_actors or max(1, min(math.ceil(tcfg.concurrency / 512), int(cpus) or 1))
    actors = max(1, min(actors, math.ceil(n_rows / tcfg.batch_size)))
    per_actor = math.ceil(tcfg.concurrency / actors)
    chunks_each = max(1, math.ceil(2 * per_actor / tcfg.batch_size))
    return {"actors": actors, "per_actor": per_actor, "batch_size": tcfg.batch_size, "chunks_in_flight": chunks_each}


def chunks(rows: list[dict], size: int) -> list[list[dict]]:
    """About `size` rows each, never splitting a question: its samples share one `n`-request (use_n)."""
    out: list[list[dict]] = []
    current: list[dict] = []
    for r in rows:
        if len(current) >= size and r["sample_index"] != current[-1]["sample_index"]:
            out.append(current)
            current = []
        current.append(r)
    return out + ([current] if current else [])


def request_ceilings(rows: list[dict], tcfg: Any) -> tuple[float, float]:
    """(tokens, USD) one request can cost at most: longest step-2 prompt + max_tokens (chars/3 per token)."""
    longest_q = max((len(r["question"]) for r in rows), default=0)
    out_tokens = max(tcfg.max_tokens, tcfg.answer_max_tokens)
    prompt_tokens = math.ceil((longest_q + 60) / 3) + tcfg.max_tokens * 2  # rationale text sits in the step-2 prompt
    price = tcfg.prices.get(tcfg.model)
    pin, pout = price.per_token(tcfg.mode) if price else (0.0, 0.0)
    return float(prompt_tokens + out_tokens), prompt_tokens * pin + out_tokens * pout


def fan_out(rows: list[dict], tcfg: Any, *, base_url: str, endpoint_id: str, secret: Secret, cache_dir: str,
            spent_usd: float = 0.0, cached: int = 0, total: Optional[int] = None,
            progress: bool = True) -> tuple[list[dict], dict]:
    """Ask for every row on the actors; returns (completions rows in any order, the gate's final counters).

    Plain Ray actors fed chunk by chunk, not Ray Data: measured here, a Ray Data actor pool took
    2.2 s longer than an actor to send its first request (2.8 s vs 0.6 s after `ray.init`), which
    on a 2,000-request fan-out is the gap between 0.45x and 0.8x of one aiohttp loop; and none of
    Ray Data's strengths (blocks of data larger than memory, fused operators) applies to a work
    list the driver holds anyway. Ray restarts a lost actor and re-runs its chunks
    (`max_restarts`, `max_task_retries`); answered requests come back from the cache.
    """
    import ray

    tokens_each, cost_each = request_ceilings(rows, tcfg)
    gated = bool(tcfg.rpm or tcfg.tpm or tcfg.budget_usd is not None)
    gate = limiter_actor_class().options(name=f"ftcot-teacher-gate-{uuid.uuid4().hex[:8]}").remote(
        rpm=tcfg.rpm, tpm=tcfg.tpm, budget_usd=tcfg.budget_usd, spent_usd=spent_usd, counters={"cache_hits": cached})
    plan = actor_plan(tcfg, len(rows), ray.cluster_resources().get("CPU", 1))
    spec = {"teacher": tcfg.model_dump(mode="json"), "base_url": base_url, "endpoint_id": endpoint_id,
            "cache_dir": str(cache_dir), "journal_dir": str(journal_dir(cache_dir)), "gated": gated,
            "tokens_each": tokens_each, "cost_each": cost_each, "per_actor": plan["per_actor"]}
    worker = ray.remote(TeacherWorker).options(num_cpus=tcfg.actor_cpus, max_restarts=3, max_task_retries=3,
                                               max_concurrency=plan["chunks_in_flight"] + 2,
                                               scheduling_strategy="SPREAD")
    actors = [worker.remote(spec, secret, gate) for _ in range(plan["actors"])]
    todo = [[json.dumps(r, ensure_ascii=False) for r in chunk] for chunk in chunks(rows, tcfg.batch_size)]
    todo.reverse()  # popped from the end: rows go out in order
    bar = _progress_bar(gate, total if total is not None else len(rows) + cached, cached, enabled=progress)
    out: list[dict] = []
    pending: dict = {}
    try:
        for a in actors:
            for _ in range(plan["chunks_in_flight"]):
                if todo:
                    pending[a.answer.remote(todo.pop())] = a
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                a = pending.pop(ref)
                out.extend(json.loads(x) for x in ray.get(ref))
                if todo:
                    pending[a.answer.remote(todo.pop())] = a
    finally:
        if bar is not None:
            bar.close()
        for a in actors:  # at once: an interrupted driver must not leave actors sending (issue 14)
            ray.kill(a)
    stats = ray.get(gate.stats.remote()) | {"plan": plan}
    ray.kill(gate)
    return out, stats


def _progress_bar(gate: Any, total: int, cached: int, enabled: bool):
    """The teacher's bar, fed from the gate's counters (None when progress is off)."""
    if not enabled:
        return None
    import ray

    from ..ray_utils import PolledBar

    def poll():
        s = ray.get(gate.stats.remote(), timeout=5)
        rate = s["requests"] / s["elapsed_s"] if s["elapsed_s"] > 0 else 0.0
        return cached + s["rows_done"] + s["rows_error"], total, format_figures(s, rate)

    return PolledBar(poll, "teacher", total, initial=cached, unit="row")


def format_figures(s: dict, req_per_s: float) -> str:
    return (f"{req_per_s:.1f} req/s, {s['prompt_tokens'] + s['completion_tokens']:,} tok, "
            f"${s['cost_usd']:.4f}, {s['rows_error']} errors, {s['cache_hits']} cache hits")
