"""`teacher.mode=batch`: the two zero-shot-CoT steps through the OpenAI Batch API, at its price.

    step 1 lines -> POST /v1/files (JSONL) -> POST /v1/batches -> poll GET /v1/batches/{id}
        -> download the output and error files -> answers into the cache
    step 2 lines (one per rationale that came back) -> the same -> rows

Runs on the driver (a few HTTP calls and a poll loop: no Ray needed), streaming the questions in
chunks of `teacher.batch_max_lines` lines (each chunk one batch, submitted without waiting for the
others), so the driver holds one chunk at a time, never the table. One line per sample; its
`custom_id` is the sample's cache key (`RequestSpec`), so a batch answer lands in the same answer
store (blocks, teacher/answers.py) as a synchronous one and the rest of the pipeline cannot tell
them apart.

Paid for once: the id of every uploaded file and created batch is written to a ledger
(`<cache_dir>/batches/`) the moment the API returns it. A run first finishes the batches the
ledger holds for its endpoint (polls them, takes their results), so a killed or restarted run
never submits them again; only then does it submit what the cache still lacks. A crash between
the upload and the batch's creation is covered too: the ledger has the file id, and the batch is
looked up by it before anything is created.

A failed line (its HTTP error, or `batch_expired` / `batch_cancelled`) is an error row, as in sync
mode; `--retry-errors` asks it again. `teacher.use_n`, `rpm` and `tpm` do not apply (the Batch API
queues on its own); `teacher.budget_usd` does: rows beyond what it affords (both steps at their
ceiling) are not submitted and carry a budget error.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..endpoint import Endpoint, Retryable, Secret, api_path, error_message, parse_reply, request_body
from .answers import AnswerIndex, AnswerStore
from .client import StepResult, split_reply
from .fanout import count_row, finish_row, request_ceilings
from .spec import RequestSpec

TERMINAL = ("completed", "failed", "expired", "cancelled")


def ledger_dir(cache_dir: str | Path) -> Path:
    from ..storage import local_side

    return local_side(cache_dir) / "batches"


class Ledger:
    """One small JSON file per submission: {id, endpoint_id, base_url, step, lines, file_id, batch_id}."""

    def __init__(self, cache_dir: str | Path):
        self.root = ledger_dir(cache_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict) -> None:
        path = self.root / f"{rec['id']}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)  # atomic: a kill leaves the old record or the new one

    def records(self, endpoint_id: str) -> list[dict]:
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("endpoint_id") == endpoint_id:
                out.append(rec)
        return sorted(out, key=lambda r: r.get("created", 0))

    def remove(self, rec: dict) -> None:
        (self.root / f"{rec['id']}.json").unlink(missing_ok=True)


class BatchRun:
    """One teach stage's batches: submit, poll, take the results; counters for the summary."""

    def __init__(self, tcfg: Any, *, base_url: str, endpoint_id: str, secret: Secret, cache_dir: str,
                 say: Callable[[str], None] = lambda m: None):
        self.t, self.endpoint_id, self.say = tcfg, endpoint_id, say
        self.spec = RequestSpec.of(tcfg, endpoint_id)
        self.base_url = base_url
        self.store, self.ledger = AnswerStore(cache_dir), Ledger(cache_dir)
        self.index = self.store.build_index()
        self.stats: Counter = Counter()
        self.http: Counter = Counter()  # the endpoint's own: uploads, creations, polls, downloads
        self.ep = Endpoint.from_config(tcfg, secret, base_url=base_url, concurrency=8, counters=self.http)
        self.keys_of: dict[str, list[str]] = {}  # this run's submissions: their lines' keys
        price = tcfg.prices.get(tcfg.model)
        self.price = price.per_token("batch") if price else (0.0, 0.0)
        self.new: list[dict] = []  # answers taken from batch output files, not yet in a block
        self.fresh_blocks: set[str] = set()  # the blocks this run wrote: its answers, not stored ones
        self.failed: dict[str, str] = {}  # failed lines of this run's batches, by cache key

    # ------------------------------------------------------------------ keys and lines

    def line(self, payload: Any, step: int, sample: int) -> tuple[str, dict]:
        key = self.spec.key(payload, step, sample)
        body = request_body(self.t.api, self.t.model, payload, max_tokens=self.spec.max_tokens_of(step),
                            temperature=self.t.temperature, top_p=self.t.top_p, seed=self.spec.seed([sample]))
        return key, {"custom_id": key, "method": "POST", "url": "/v1" + api_path(self.t.api), "body": body}

    def refresh(self) -> None:
        """Taken answers into blocks, and the index over them."""
        for i in range(0, len(self.new), 4096):
            self.fresh_blocks.add(self.store.write_block(self.new[i:i + 4096]))
        self.new = []
        self.index = self.store.build_index()

    # ------------------------------------------------------------------ the stage's part

    async def run(self, chunks: Callable[[], Iterator[list[dict]]], write: Callable[[list[dict]], None],
                  spent_usd: float = 0.0, longest_question: int = 0) -> None:
        """`chunks()` streams the questions (again for each pass); `write(rows)` takes each chunk's rows."""
        try:
            await self.resume()
            self.refresh()
            start = self.index  # what was stored before this run: decides which rows the budget must pay for
            budget = self.budget(spent_usd, longest_question)
            for step in (1, 2):
                recs = [await self.submit(step, lines) for lines in self.lines(chunks(), step, start, budget)]
                await asyncio.gather(*(self.wait_and_take(rec, keep_failures=True) for rec in recs))
                self.refresh()
            for questions in chunks():
                write(self.rows(questions, start, budget))
        finally:
            await self.ep.close()

    def budget(self, spent_usd: float, longest_question: int) -> Optional[int]:
        """Rows `teacher.budget_usd` pays for, both steps at their ceiling (None: no budget)."""
        if self.t.budget_usd is None:
            return None
        _, cost_each = request_ceilings(longest_question, self.t)
        if cost_each <= 0:
            return None
        return int(max(0.0, self.t.budget_usd - spent_usd) // (2 * cost_each))

    def samples(self, questions: list[dict], start: AnswerIndex, budget: Optional[int], counter: list[int]):
        """(question, sample, allowed by the budget) in stream order; a row already stored whole at the start
        costs nothing, so the budget counts only the others (`counter` carries the count over chunks)."""
        for q in questions:
            for i in range(self.t.samples):
                allowed = True
                if budget is not None and not self.stored_whole(start, q["question"], i):
                    allowed = counter[0] < budget
                    counter[0] += 1
                yield q, i, allowed

    def stored_whole(self, index: AnswerIndex, question: str, i: int) -> bool:
        s1 = index.get_many([self.spec.step1_key(question, i)])
        if not s1:
            return False
        (hit,) = s1.values()
        return bool(index.get_many([self.spec.step2_key(question, hit["text"], i)]))

    def lines(self, chunks: Iterator[list[dict]], step: int, start: AnswerIndex, budget: Optional[int]) -> Iterator[list[dict]]:
        """The lines of `step` not answered yet, in chunks of `teacher.batch_max_lines`."""
        out: list[dict] = []
        counter = [0]
        for questions in chunks:
            for q, i, allowed in self.samples(questions, start, budget, counter):
                if not allowed:
                    continue
                if step == 1:
                    payload = self.spec.payload(q["question"])
                else:
                    s1 = self.index.get_many([self.spec.step1_key(q["question"], i)])
                    if not s1:
                        continue
                    payload = self.spec.payload(q["question"], next(iter(s1.values()))["text"])
                key, ln = self.line(payload, step, i)
                if not self.index.get_many([key]):
                    out.append(ln)
                if len(out) >= self.t.batch_max_lines:
                    yield out
                    out = []
        if out:
            yield out

    def rows(self, questions: list[dict], start: AnswerIndex, budget: Optional[int]) -> list[dict]:
        out = []
        counter = [0]
        for q, i, allowed in self.samples(questions, start, budget, counter):
            out.append(self.row(q | {"sample_idx": i}, allowed))
        return out

    def result(self, key: str) -> Optional[StepResult]:
        """A step's answer: from this run's batches (one attempt each), or stored before (a cache hit)."""
        hit = self.index.get_many([key])
        if not hit:
            return None
        res = StepResult.from_cache(hit[key])
        if self.index.names[self.index.where([key])[0]] in self.fresh_blocks:
            res.attempts, res.cached = 1, False
        else:
            self.stats["cache_hits"] += 1
        return res

    def row(self, r: dict, allowed: bool) -> dict:
        q, i = r["question"], r["sample_idx"]
        k1 = self.spec.step1_key(q, i)
        s1 = self.result(k1)
        if s1 is None:
            if not allowed:
                error, attempts = f"budget: not sent, teacher.budget_usd={self.t.budget_usd} would be exceeded", 0
            else:
                error, attempts = self.failed.get(k1, "batch: no result for this line"), 1
            out = finish_row(r, self.t, StepResult(error=error, attempts=attempts), None)
        else:
            k2 = self.spec.step2_key(q, s1.text, i)
            s2 = self.result(k2) or StepResult(error=self.failed.get(k2, "batch: no result for this line"), attempts=1)
            out = finish_row(r, self.t, s1, s2)
        count_row(self.stats, out)
        return out

    # ------------------------------------------------------------------ submitting and polling

    async def resume(self) -> None:
        """Finish the batches an earlier run of this endpoint submitted: never submit them twice."""
        recs = self.ledger.records(self.endpoint_id)
        if not recs:
            return
        self.say(f"teacher batch: resuming {len(recs)} batch(es) submitted by an earlier run")
        self.stats["batches_resumed"] += len(recs)
        await asyncio.gather(*(self.wait_and_take(rec, keep_failures=False) for rec in recs))

    async def submit_and_wait(self, step: int, lines: list[dict]) -> None:
        chunks = [lines[i:i + self.t.batch_max_lines] for i in range(0, len(lines), self.t.batch_max_lines)]
        recs = [await self.submit(step, chunk) for chunk in chunks]
        await asyncio.gather(*(self.wait_and_take(rec, keep_failures=True) for rec in recs))

    async def submit(self, step: int, lines: list[dict]) -> dict:
        import aiohttp

        content = "".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines).encode()

        def form() -> aiohttp.FormData:
            fd = aiohttp.FormData()
            fd.add_field("purpose", "batch")
            fd.add_field("file", content, filename=f"ftcot-teach-step{step}.jsonl", content_type="application/jsonl")
            return fd

        file, _ = await self.ep.call("POST", "/files", data=form)
        rec = {"id": uuid.uuid4().hex, "endpoint_id": self.endpoint_id, "base_url": self.base_url, "step": step,
               "lines": len(lines), "file_id": file["id"], "batch_id": None, "created": time.time()}
        self.ledger.write(rec)  # before the batch exists: a crash now is found again by its file id
        self.keys_of[rec["id"]] = [ln["custom_id"] for ln in lines]
        batch, _ = await self.ep.call("POST", "/batches", body={
            "input_file_id": file["id"], "endpoint": "/v1" + api_path(self.t.api),
            "completion_window": self.t.batch_window, "metadata": {"ftcot": f"teach step {step}"}})
        rec["batch_id"] = batch["id"]
        self.ledger.write(rec)  # at once: from here a restarted run polls this batch
        self.stats["batches"] += 1
        self.stats[f"step{step}_requests"] += len(lines)
        self.stats["lines_submitted"] += len(lines)
        self.say(f"teacher batch: step {step}, {len(lines)} lines submitted as {batch['id']}")
        return rec

    async def find_batch(self, file_id: str) -> Optional[str]:
        """The batch created from `file_id` (a crash right after its creation), if any."""
        after = None
        for _ in range(20):  # the newest 2,000 batches
            page, _ = await self.ep.call("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            for b in page.get("data") or []:
                if b.get("input_file_id") == file_id:
                    return b["id"]
            if not page.get("has_more"):
                return None
            after = page.get("last_id")
        return None

    async def wait_and_take(self, rec: dict, keep_failures: bool) -> None:
        if rec.get("batch_id") is None:
            rec["batch_id"] = await self.find_batch(rec["file_id"])
            if rec["batch_id"] is None:  # never created: nothing was paid, its lines are asked afresh
                self.ledger.remove(rec)
                return
            self.ledger.write(rec)
        batch = await self.wait(rec["batch_id"])
        await self.take(batch, rec["step"], keep_failures, self.keys_of.get(rec["id"], []))
        self.ledger.remove(rec)  # its answers are in the cache now

    async def wait(self, batch_id: str) -> dict:
        last = None
        while True:
            batch, _ = await self.ep.call("GET", f"/batches/{batch_id}")
            counts = batch.get("request_counts") or {}
            state = (batch["status"], counts.get("completed"), counts.get("failed"))
            if state != last:
                self.say(f"teacher batch {batch_id}: {batch['status']} "
                         f"{counts.get('completed', 0)}/{counts.get('total', '?')} done, {counts.get('failed', 0)} failed")
                last = state
            if batch["status"] in TERMINAL:
                return batch
            await asyncio.sleep(self.t.batch_poll_s)

    async def take(self, batch: dict, step: int, keep_failures: bool, keys: list[str]) -> None:
        """Download the output and error files: answers into the cache, failures kept for the rows."""
        for fid in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not fid:
                continue
            raw, _ = await self.ep.call("GET", f"/files/{fid}/content", parse=lambda b: b,
                                        timeout_s=max(self.t.timeout_s, 300.0))
            for text in raw.decode("utf-8").splitlines():
                if text.strip():
                    self.take_line(json.loads(text), step, keep_failures)
        if batch["status"] == "failed":  # refused as a whole (its input did not validate)
            errors = (batch.get("errors") or {}).get("data") or []
            why = "; ".join(str(e.get("message")) for e in errors[:3]) or "no reason given"
            self.stats["failed_batches"] += 1
            self.say(f"teacher batch {batch['id']} failed: {why}")
            for k in keys:
                self.fail(k, f"batch {batch['id']} failed: {why}", keep_failures)

    def take_line(self, line: dict, step: int, keep_failures: bool) -> None:
        key, resp, err = line.get("custom_id"), line.get("response"), line.get("error")
        if resp is not None and resp.get("status_code") == 200:
            try:
                reply = parse_reply(self.t.api, resp["body"], 1)
            except Retryable as e:
                return self.fail(key, f"batch line: {e}", keep_failures)
            result = split_reply(reply, [0], self.price)[0]
            result.attempts = 1
            self.new.append(result.to_cache() | {"key": key})
            for name, value in (("prompt_tokens", result.prompt_tokens), ("completion_tokens", result.completion_tokens)):
                self.stats[name] += value
                self.stats[f"step{step}_{name}"] += value
            self.stats["cost_usd"] += result.cost_usd
            return
        if resp is not None:
            raw = json.dumps(resp.get("body") or {}).encode()
            return self.fail(key, f"batch line: HTTP {resp.get('status_code')}: {error_message(raw)}", keep_failures)
        err = err or {}
        self.fail(key, f"batch line: {err.get('code', 'error')}: {err.get('message', '')}".strip(), keep_failures)

    def fail(self, key: str, message: str, keep: bool) -> None:
        self.stats["failed_requests"] += 1
        if keep:
            self.failed[key] = message[:500]


def run_batches(chunks: Callable[[], Iterator[list[dict]]], write: Callable[[list[dict]], None], tcfg: Any, *,
                base_url: str, endpoint_id: str, secret: Secret, cache_dir: str, spent_usd: float = 0.0,
                longest_question: int = 0, say: Callable[[str], None] = lambda m: None) -> dict:
    """The batch-mode counterpart of the Ray Data fan-out: rows go to `write` chunk by chunk; returns counters."""
    from ..endpoint import run_sync

    run = BatchRun(tcfg, base_url=base_url, endpoint_id=endpoint_id, secret=secret, cache_dir=cache_dir, say=say)
    run_sync(lambda: run.run(chunks, write, spent_usd, longest_question))
    stats = dict(run.stats)
    stats.update(requests=stats.get("lines_submitted", 0), http_calls=run.http.get("requests", 0),
                 retries=run.http.get("retries", 0))
    return stats


__all__ = ["run_batches", "BatchRun", "Ledger", "ledger_dir"]
