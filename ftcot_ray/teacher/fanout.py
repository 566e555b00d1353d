"""The teacher fan-out: problems x D samples -> completions rows, on Ray Data.

What happens to one question (plain async functions, testable without Ray): step 1 asks for the
rationales of its samples (one `n`-request or one request per sample), step 2 asks each rationale
for its answer. Where it runs: a Ray Data `map_batches` over rows with an async callable class,
`concurrency=teacher.num_actors` actors, each keeping `teacher.concurrency` requests in flight on
one event loop; every actor shares ONE gate actor (rate limits, budget, counters). The driver
shows a live bar fed from the gate's counters. Rows travel as JSON strings: no Arrow schema
surprises from all-null columns.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import uuid
from collections import defaultdict
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
    """Ray Data callable class: one AsyncOpenAI client and one semaphore per actor, shared by all its batches."""

    def __init__(self, spec: dict, secret: Secret, gate: Any):
        from ..config import TeacherConfig

        self.spec, self.secret, self.gate = spec, secret, gate
        self.t = TeacherConfig.model_validate(spec["teacher"])
        self.client: Optional[TeacherClient] = None

    def _ensure(self) -> TeacherClient:
        if self.client is None:  # created on the actor's event loop, at the first batch
            permits = Permits(self.gate, self.spec["gated"], self.spec["tokens_each"], self.spec["cost_each"])
            self.client = TeacherClient(self.t, base_url=self.spec["base_url"], endpoint_id=self.spec["endpoint_id"],
                                        secret=self.secret, cache=AnswerCache(self.spec["cache_dir"]), permits=permits)
            asyncio.ensure_future(self._flush_loop())
        return self.client

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.client.permits.flush()
            except Exception:  # progress is best effort; the batch-end flush is awaited
                pass

    async def __call__(self, batch: dict) -> dict:
        client = self._ensure()
        rows = [json.loads(x) for x in batch["row"]]
        out = await answer_rows(client, self.t, rows)
        await client.permits.flush()
        return {"row": [json.dumps(r, ensure_ascii=False) for r in out]}


def request_ceilings(rows: list[dict], tcfg: Any) -> tuple[float, float]:
    """(tokens, USD) one request can cost at most: longest step-2 prompt + max_tokens (chars/3 per token)."""
    longest_q = max((len(r["question"]) for r in rows), default=0)
    out_tokens = max(tcfg.max_tokens, tcfg.answer_max_tokens)
    prompt_tokens = math.ceil((longest_q + 60) / 3) + tcfg.max_tokens * 2  # rationale text sits in the step-2 prompt
    price = tcfg.prices.get(tcfg.model)
    cost = (prompt_tokens * price.input + out_tokens * price.output) / 1e6 if price else 0.0
    return float(prompt_tokens + out_tokens), cost


def fan_out(rows: list[dict], tcfg: Any, *, base_url: str, endpoint_id: str, secret: Secret, cache_dir: str,
            spent_usd: float = 0.0, cached: int = 0, total: Optional[int] = None,
            progress: bool = True) -> tuple[list[dict], dict]:
    """Ask for every row on Ray Data; returns (completions rows in any order, the gate's final counters)."""
    import ray

    tokens_each, cost_each = request_ceilings(rows, tcfg)
    gated = bool(tcfg.rpm or tcfg.tpm or tcfg.budget_usd is not None)
    gate = limiter_actor_class().options(name=f"ftcot-teacher-gate-{uuid.uuid4().hex[:8]}").remote(
        rpm=tcfg.rpm, tpm=tcfg.tpm, budget_usd=tcfg.budget_usd, spent_usd=spent_usd, counters={"cache_hits": cached})
    spec = {"teacher": tcfg.model_dump(mode="json"), "base_url": base_url, "endpoint_id": endpoint_id,
            "cache_dir": str(cache_dir), "gated": gated, "tokens_each": tokens_each, "cost_each": cost_each}
    # Rows per batch: teacher.batch_size, by default as many as one actor keeps in flight.
    batch = max(1, min(tcfg.batch_size or tcfg.concurrency, math.ceil(len(rows) / tcfg.num_actors)))
    # Several batches per block: Ray Data runs up to 4 batches of a block at once on the actor's loop,
    # so the semaphore stays full while a batch's slowest rows finish.
    blocks = max(tcfg.num_actors, math.ceil(len(rows) / (4 * batch)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below says more (tokens, $, errors, cache hits)
    ds = ray.data.from_items([{"row": json.dumps(r, ensure_ascii=False)} for r in rows], override_num_blocks=blocks)
    ds = ds.map_batches(TeacherWorker, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=tcfg.num_actors), num_cpus=tcfg.actor_cpus,
                        fn_constructor_kwargs={"spec": spec, "secret": secret, "gate": gate})
    bar = _ProgressBar(gate, total if total is not None else len(rows) + cached, cached, enabled=progress)
    out: list[dict] = []
    try:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out.extend(json.loads(x) for x in b["row"])
    finally:
        bar.close()
    stats = ray.get(gate.stats.remote())
    ray.kill(gate)
    return out, stats


class _ProgressBar:
    """tqdm in the driver, fed from the gate's counters every half second."""

    def __init__(self, gate: Any, total: int, cached: int, enabled: bool):
        self.gate, self.cached, self.stop = gate, cached, threading.Event()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=cached, desc="teacher", unit="row", dynamic_ncols=True)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        import ray

        while not self.stop.wait(0.5):
            try:
                self.update(ray.get(self.gate.stats.remote(), timeout=5))
            except Exception:
                pass

    def update(self, s: dict) -> None:
        done = self.cached + s["rows_done"] + s["rows_error"]
        self.bar.n = done
        rate = s["requests"] / s["elapsed_s"] if s["elapsed_s"] > 0 else 0.0
        self.bar.set_postfix_str(format_figures(s, rate), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.stop.set()
            self.thread.join(2)
            try:
                import ray

                self.update(ray.get(self.gate.stats.remote(), timeout=5))
            except Exception:
                pass
            self.bar.close()


def format_figures(s: dict, req_per_s: float) -> str:
    return (f"{req_per_s:.1f} req/s, {s['prompt_tokens'] + s['completion_tokens']:,} tok, "
            f"${s['cost_usd']:.4f}, {s['rows_error']} errors, {s['cache_hits']} cache hits")
