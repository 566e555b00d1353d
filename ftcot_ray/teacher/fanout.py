"""The teacher fan-out: questions -> D_max samples each -> completions rows, as one Ray Data pipeline.

What happens to one question (plain async functions, testable without Ray): step 1 asks for the
rationales of its samples (one `n`-request or one request per sample, `RequestSpec.groups`), step 2
asks each rationale for its answer; every step looks at the stored answers first.

Where it runs: `fan_out` returns the lazy pipeline

    questions (the problems table, read by Ray Data) -> map_batches(TeacherWorker)

over an autoscaling Ray Data actor pool (at most `teacher.num_actors` async workers). Each worker is
one event loop with one pooled HTTP client (ftcot_ray/endpoint.py) keeping its share of
`teacher.concurrency` requests in flight, the run's answer index (teacher/answers.py, shared through
the object store), and its own answer log. Every worker shares ONE gate actor (rate limits, budget,
counters), which also feeds the driver's progress bar. The stage writes the pipeline's output as
Parquet shards as blocks finish: the driver holds counters, never rows.

Why Ray Data and not the plain actors this replaced: those were fed by a driver that held every row
(4.4 GB at a million questions) and collected every answer back. A Ray Data actor pool starts about
2 s later than a plain actor, which a run of a few thousand requests notices and a run of hours does not.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import defaultdict
from typing import Any, AsyncIterator, Optional

from ..prompts import answer_prompt, reasoning_prompt
from ..schemas import COMPLETION_COLUMNS
from .answers import AnswerIndex, AnswerStore
from .client import Secret, StepResult, TeacherClient
from .limiter import Permits, limiter_actor_class
from .spec import RequestSpec

QUESTION_COLUMNS = ("sample_index", "split", "question", "answer")
ROW_BASE = ("sample_index", "sample_idx", "split", "question", "answer")


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


async def answer_question(client: TeacherClient, tcfg: Any, question: dict, samples: list[int]) -> list[dict]:
    """The given samples of one question: step 1, then step 2 on each rationale.

    Each sample goes on to its step 2 as soon as its own step 1 is back (with `use_n`, one request
    brings all rationales at once): waiting for siblings would hold budget and slots for nothing.
    """
    q = question["question"]

    async def second(i: int, s1: StepResult) -> dict:
        row = question | {"sample_idx": i}
        if s1.error is not None:
            return finish_row(row, tcfg, s1, None)  # (a failed step 1 released its reservation already)
        # A rationale asked for in this run prepaid its answer's budget (see `Permits`).
        res = await client.step(q, s1.text, [i], prepaid=not s1.cached)
        return finish_row(row, tcfg, s1, res[i])

    async def whole(i: int) -> dict:
        first = await client.step(q, None, [i])
        return await second(i, first[i])

    if tcfg.use_n and len(samples) > 1:
        first = await client.step(q, None, samples)
        out = await asyncio.gather(*(second(i, first[i]) for i in samples))
    elif len(samples) == 1:  # no task of its own: a task per request costs as much CPU as sending it
        out = [await whole(samples[0])]
    else:
        out = await asyncio.gather(*(whole(i) for i in samples))
    for r in out:
        count_row(client.delta, r)
    return list(out)


def count_row(delta: Any, r: dict) -> None:
    """What the written table holds, counted as each row leaves a worker (the stage's summary)."""
    delta["rows_error" if r["error"] else "rows_done"] += 1
    delta["rows_truncated"] += r["finish_reason"] == "length"
    delta["rows_cost_usd"] += r["cost_usd"] or 0.0
    delta["rows_budget_unsent"] += bool(r["error"]) and "budget:" in r["error"]


async def answer_questions(client: TeacherClient, tcfg: Any, questions: list[dict],
                           samples: Optional[int] = None) -> list[dict]:
    """Every question's samples 0..D_max-1 (or `samples`), questions concurrently; rows in question order."""
    d = samples or tcfg.samples
    client.delta["questions"] += len(questions)
    groups = await asyncio.gather(*(answer_question(client, tcfg, q, list(range(d))) for q in questions))
    return [r for g in groups for r in g]


async def answer_rows(client: TeacherClient, tcfg: Any, rows: list[dict]) -> list[dict]:
    """Rows of (question, sample_idx) as they come (a pilot's or a test's pick), grouped by question."""
    by_question: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_question[r["sample_index"]].append(r)
    client.delta["questions"] += len(by_question)
    groups = await asyncio.gather(*(answer_question(client, tcfg, {k: g[0][k] for k in QUESTION_COLUMNS},
                                                    [r["sample_idx"] for r in g]) for g in by_question.values()))
    return [r for g in groups for r in g]


# --------------------------------------------------------------------------- Ray wiring


class TeacherWorker:
    """One worker of the Ray Data actor pool: an event loop with one pooled endpoint client, the run's
    answer index (read-only, from the object store) and this worker's answer log."""

    def __init__(self, spec: dict, secret: Secret, gate: Any, index: list):
        import ray

        from ..config import TeacherConfig

        self.spec, self.secret, self.gate = spec, secret, gate
        self.t = TeacherConfig.model_validate(spec["teacher"])
        self.index: Optional[AnswerIndex] = ray.get(index[0]) if index and index[0] is not None else None
        self.log = AnswerStore(spec["cache_dir"]).log(self.t.cache_block_rows, self.t.cache_flush_s, spec["run"])
        self.client: Optional[TeacherClient] = None
        self.flushing: Optional[asyncio.Task] = None

    def _ensure(self) -> TeacherClient:
        if self.client is None:  # created on the worker's event loop, at its first batch
            permits = Permits(self.gate, self.spec["gated"], self.spec["cost_each"])
            self.client = TeacherClient(self.t, base_url=self.spec["base_url"], endpoint_id=self.spec["endpoint_id"],
                                        secret=self.secret, permits=permits, index=self.index, log=self.log,
                                        concurrency=self.spec["per_worker"])
            asyncio.ensure_future(self._background())
        return self.client

    async def _background(self) -> None:
        """Counters to the gate every 0.5 s (progress; another worker's 429 pause); a block when one is due."""
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.client.permits.flush()
            except Exception:  # progress is best effort; the batch-end flush is awaited
                pass
            self._seal_if_due()

    def _seal_if_due(self) -> None:
        if self.log.due() and (self.flushing is None or self.flushing.done()):
            taken = self.log.rotate()  # on the loop: the journal switches over here
            if taken is not None:  # the block is written off the loop (an object PUT may take a while)
                self.flushing = asyncio.ensure_future(asyncio.to_thread(self.log.seal, taken))

    async def __call__(self, batch: dict) -> AsyncIterator[dict]:
        client = self._ensure()
        questions = [dict(zip(QUESTION_COLUMNS, values)) for values in zip(*(batch[c] for c in QUESTION_COLUMNS))]
        questions = [{k: (v.item() if hasattr(v, "item") else v) for k, v in q.items()} for q in questions]
        rows = await answer_questions(client, self.t, questions)
        await client.permits.flush()
        self._seal_if_due()
        yield {c: [r[c] for r in rows] for c in COMPLETION_COLUMNS}

    def __del__(self) -> None:  # Ray Data's graceful shutdown of the pool: what is pending becomes a block
        try:
            if self.flushing is not None and not self.flushing.done():
                return  # a block is being written: the journal stays, and the next run recovers it
            self.log.close()
        except Exception:
            pass  # a journal left behind is recovered by the next run (answers.recover_orphans)


# --------------------------------------------------------------------------- sizing


def worker_plan(tcfg: Any, n_questions: int, cpus: float) -> dict:
    """How the fan-out runs: workers, requests in flight each, questions per batch, batches in flight each.

    Workers: `teacher.num_actors`, else one per 512 requests in flight, at most one per CPU Ray has:
    one worker's event loop sends over 1,000 req/s on one core here, and on two shared cores a second
    one at 256 in flight only added start-up time. Each worker holds enough batches at once for twice
    its share of requests in flight, so a batch's slowest rows never leave slots idle. (Never more
    workers than blocks of 4 batches: an idle worker costs its start-up and does nothing.)
    """
    workers = tcfg.num_actors or max(1, min(math.ceil(tcfg.concurrency / 512), int(cpus) or 1))
    workers = max(1, min(workers, math.ceil(max(1, n_questions) / (4 * tcfg.batch_size))))
    per_worker = math.ceil(tcfg.concurrency / workers)
    batches = math.ceil(2 * per_worker / (tcfg.batch_size * tcfg.samples))
    # Ray Data runs 4 batches of a task at once (an async UDF's default), so tasks in flight = batches / 4.
    return {"workers": workers, "per_worker": per_worker, "batch_size": tcfg.batch_size,
            "tasks_in_flight": max(2, math.ceil(batches / 4) + 1)}


def request_ceilings(longest_question: int, tcfg: Any) -> tuple[float, float]:
    """(tokens, USD) one request can cost at most (see `RequestSpec.ceilings`)."""
    prompt_tokens, out_tokens = RequestSpec.of(tcfg, "").ceilings(longest_question)
    price = tcfg.prices.get(tcfg.model)
    pin, pout = price.per_token(tcfg.mode) if price else (0.0, 0.0)
    return float(prompt_tokens + out_tokens), prompt_tokens * pin + out_tokens * pout


def start_gate(tcfg: Any, spent_usd: float):
    """The job's one gate actor (rate limits, budget, counters); `spent_usd`: what the stored rows cost."""
    return limiter_actor_class().options(name=f"ftcot-teacher-gate-{uuid.uuid4().hex[:8]}").remote(
        rpm=tcfg.rpm, tpm=tcfg.tpm, budget_usd=tcfg.budget_usd, spent_usd=spent_usd)


def fan_out(questions, tcfg: Any, *, gate: Any, index_ref: Any, base_url: str, endpoint_id: str, secret: Secret,
            cache_dir: str, n_questions: int, longest_question: int, run: str = ""):
    """The lazy pipeline questions -> completions rows (a Ray Dataset; nothing runs until it is written).
    `run` tags the workers' journals (`AnswerStore.recover_orphans(wait_for=run)`)."""
    import ray

    _, cost_each = request_ceilings(longest_question, tcfg)
    plan = worker_plan(tcfg, n_questions, ray.cluster_resources().get("CPU", 1))
    spec = {"teacher": tcfg.model_dump(mode="json"), "base_url": base_url, "endpoint_id": endpoint_id,
            "cache_dir": str(cache_dir), "run": run, "gated": bool(tcfg.rpm or tcfg.tpm or tcfg.budget_usd is not None),
            "cost_each": cost_each, "per_worker": plan["per_worker"]}
    # Blocks of 4 batches (what Ray Data runs at once inside one task of an async UDF): enough tasks for
    # every worker, however few or large the blocks the questions were read in.
    ds = questions.repartition(target_num_rows_per_block=4 * tcfg.batch_size).map_batches(
        TeacherWorker, fn_constructor_kwargs={"spec": spec, "secret": secret, "gate": gate, "index": [index_ref]},
        batch_size=tcfg.batch_size, batch_format="numpy",
        # A lost worker is restarted and its batches retried (Ray Data's actor defaults); answered requests
        # come back from the store.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan["workers"], initial_size=plan["workers"],
                                           max_tasks_in_flight_per_actor=plan["tasks_in_flight"],
                                           max_concurrent_calls_per_actor=plan["tasks_in_flight"]),
        num_cpus=tcfg.actor_cpus)
    return ds, plan


def progress_bar(gate: Any, total: int, enabled: bool):
    """The teacher's bar, fed from the gate's counters (None when progress is off)."""
    if not enabled:
        return None
    import ray

    from ..ray_utils import PolledBar

    def poll():
        s = ray.get(gate.stats.remote(), timeout=5)
        rate = s["requests"] / s["elapsed_s"] if s["elapsed_s"] > 0 else 0.0
        return s["rows_done"] + s["rows_error"], total, format_figures(s, rate)

    return PolledBar(poll, "teacher", total, unit="row")


def format_figures(s: dict, req_per_s: float) -> str:
    return (f"{req_per_s:.1f} req/s, {s['prompt_tokens'] + s['completion_tokens']:,} tok, "
            f"${s['cost_usd']:.4f}, {s['rows_error']} errors, {s['cache_hits']} cache hits")
