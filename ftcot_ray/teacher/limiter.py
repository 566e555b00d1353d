"""One rate limit, one budget and one set of counters for the whole teacher job.

`JobGate` is the plain logic (token buckets for requests/min and tokens/min, a job-wide pause
after a 429's Retry-After, a USD budget with reservations, progress counters). `LimiterActor` is
that gate as ONE named async Ray actor shared by every worker on every node. `Permits` is the
worker side: concurrent requests that need a permit at the same moment are coalesced into one
actor call, so the actor is asked once per burst, not once per request; with no rpm/tpm/budget set
the actor is off the hot path entirely and only receives counter flushes (every 0.5 s).

Rate limits hold in every window: a bucket holds one second's worth (the burst) and refills at
(limit - burst) per minute, so no 60-second window ever sees more than the limit. Tokens per minute
are charged at send time by an estimate (the prompt's characters / 4, plus the completion tokens
this worker has been seeing) and corrected with the usage the response reports (the correction
flows back with the counters), instead of charging every request the worst case.

Budget: each request reserves a ceiling cost (its longest prompt + max_tokens at the model's
price) before it is sent, and the reservation is swapped for the real cost when usage comes back.
So the job stops *before* the budget would be exceeded, a little early rather than a little late.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import Any, Optional

COUNTERS = ("rows_done", "rows_error", "requests", "failed_requests", "retries", "cache_hits",
            "prompt_tokens", "completion_tokens", "cost_usd",
            # what the written table holds (cached rows included), counted as rows leave the workers
            "questions", "rows_truncated", "rows_cost_usd", "rows_budget_unsent",
            # per step: distinct requests (retries not counted again) and the usage they reported
            "step1_requests", "step1_prompt_tokens", "step1_completion_tokens",
            "step2_requests", "step2_prompt_tokens", "step2_completion_tokens")


class BudgetExhausted(RuntimeError):
    """teacher.budget_usd would be exceeded by the next request: nothing more is sent."""


class TokenBucket:
    """`limit` per minute in every 60-second window: a burst of `burst_s` worth, refilled at (limit - burst) / 60 s."""

    def __init__(self, per_minute: float, burst_s: float = 1.0):
        self.capacity = max(1.0, per_minute / 60.0 * burst_s)
        self.rate = max(per_minute - self.capacity, per_minute / 120.0) / 60.0
        self.level = self.capacity
        self.t = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def available(self, cost: float, now: float) -> int:
        self._refill(now)
        # A single request bigger than the bucket may go when the bucket is full (else it never could).
        if cost > self.capacity:
            return 1 if self.level >= self.capacity else 0
        return int(self.level // cost) if cost > 0 else 1 << 30

    def take(self, n: int, cost: float) -> None:
        self.level -= n * cost

    def prefix(self, costs: list[float], now: float) -> int:
        """How many of `costs`, in order, the bucket can pay now."""
        self._refill(now)
        if costs and costs[0] > self.capacity:  # a request bigger than the bucket goes when it is full
            return 1 if self.level >= self.capacity else 0
        level, n = self.level, 0
        for c in costs:
            if c > level:
                break
            level -= c
            n += 1
        return n

    def correct(self, tokens: float) -> None:
        """Charge (or refund) the difference between what a request really used and its estimate."""
        self.level = min(self.capacity, self.level - tokens)

    def wait_for(self, cost: float) -> float:
        need = min(cost, self.capacity) - self.level
        return max(0.0, need / self.rate) if self.rate > 0 else 1.0


class JobGate:
    """Permits under RPM/TPM, the job-wide pause, the budget; counters for progress (no Ray here)."""

    def __init__(self, rpm: Optional[int] = None, tpm: Optional[int] = None, budget_usd: Optional[float] = None,
                 spent_usd: float = 0.0, counters: Optional[dict] = None):
        self.requests = TokenBucket(rpm) if rpm else None
        self.tokens = TokenBucket(tpm) if tpm else None
        self.budget = budget_usd
        self.spent = float(spent_usd)  # includes cached rows' cost: the budget is for the whole table
        self.reserved = 0.0
        self.pause_until = 0.0
        self.budget_stopped = False
        self.counters: Counter = Counter(counters or {})
        self.started = time.time()

    def acquire(self, tokens: list[float], cost_each: float) -> dict:
        """Grant permits to a prefix of the requests whose estimated `tokens` are given (TPM): {"granted",
        "wait_s", "budget_stop"}."""
        n, now = len(tokens), time.monotonic()
        if self.budget_stopped and cost_each > 0:  # 0-cost permits were paid for at step 1
            return {"granted": 0, "wait_s": 0.0, "budget_stop": True}
        if now < self.pause_until:
            return {"granted": 0, "wait_s": self.pause_until - now, "budget_stop": False}
        if self.budget is not None and cost_each > 0:
            afford = math.floor((self.budget - self.spent - self.reserved) / cost_each + 1e-9)
            if afford <= 0:
                if self.reserved > 1e-12:  # in-flight requests may cost less than reserved: wait for them
                    return {"granted": 0, "wait_s": 0.05, "budget_stop": False}
                self.budget_stopped = True
                return {"granted": 0, "wait_s": 0.0, "budget_stop": True}
            n = min(n, afford)
        if self.requests is not None:
            n = min(n, self.requests.available(1.0, now))
        if self.tokens is not None:
            n = min(n, self.tokens.prefix(tokens[:n], now))
        if n <= 0:
            waits = [self.requests.wait_for(1.0)] if self.requests is not None else []
            if self.tokens is not None:
                waits.append(self.tokens.wait_for(tokens[0]))
            return {"granted": 0, "wait_s": max(0.01, max(waits, default=0.01)), "budget_stop": False}
        if self.requests is not None:
            self.requests.take(n, 1.0)
        if self.tokens is not None:
            self.tokens.level -= sum(tokens[:n])
        self.reserved += n * cost_each
        return {"granted": n, "wait_s": 0.0, "budget_stop": False}

    def report(self, delta: dict) -> dict:
        """Add a worker's counter deltas; swap released reservations for real cost. Returns the pause left."""
        for k, v in delta.items():
            if k in COUNTERS:
                self.counters[k] += v
        self.spent += delta.get("cost_usd", 0.0)
        self.reserved = max(0.0, self.reserved - delta.get("released_usd", 0.0))
        if self.tokens is not None and delta.get("tpm_correction"):
            self.tokens.correct(delta["tpm_correction"])
        return {"pause_s": max(0.0, self.pause_until - time.monotonic()), "budget_stop": self.budget_stopped}

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After: nobody in the job sends until then."""
        self.pause_until = max(self.pause_until, time.monotonic() + seconds)

    def stats(self) -> dict:
        out = {k: self.counters.get(k, 0) for k in COUNTERS}
        out.update(spent_usd=self.spent, budget_usd=self.budget, budget_stopped=self.budget_stopped,
                   elapsed_s=time.time() - self.started)
        return out


def limiter_actor_class():
    """The Ray actor class, built lazily so importing this module does not import Ray."""
    import ray

    @ray.remote(num_cpus=0)
    class LimiterActor:
        def __init__(self, **kwargs: Any):
            self.gate = JobGate(**kwargs)

        async def acquire(self, tokens: list[float], cost_each: float) -> dict:
            return self.gate.acquire(tokens, cost_each)

        async def report(self, delta: dict) -> dict:
            return self.gate.report(delta)

        async def pause(self, seconds: float) -> None:
            self.gate.pause(seconds)

        async def stats(self) -> dict:
            return self.gate.stats()

    return LimiterActor


class Permits:
    """Worker side of the gate. `gated=False` (no rpm/tpm/budget): no actor call per request.

    Budget is reserved in units of `cost_each` (one request's ceiling). A step-1 request for k
    samples reserves 2k units and, when it succeeds, keeps k of them for the k step-2 requests, so
    a rationale that was paid for is never left without its answer for lack of budget; step 2
    then asks with 0 units (rate limits still apply) and releases its unit when it is done.
    """

    def __init__(self, gate: Any, gated: bool, cost_each: float, local: bool = False):
        self.gate, self.gated, self.local = gate, gated, local  # local: `gate` is a JobGate, not an actor
        self.cost_each = cost_each
        self.waiters: list[tuple[int, float, asyncio.Future]] = []
        self.fetching = False
        self.pause_until = 0.0
        self.stopped = False
        self.flush_soon = False
        self.delta: Counter = Counter()

    async def _call(self, method: str, *args: Any) -> Any:
        if self.local:
            return getattr(self.gate, method)(*args)
        return await getattr(self.gate, method).remote(*args)

    async def acquire(self, units: int = 1, tokens: float = 1.0) -> None:
        """Wait for a permit reserving `units` x cost_each and an estimated `tokens` of the TPM limit;
        BudgetExhausted when the reservation would exceed the budget."""
        if self.stopped and units > 0:
            raise BudgetExhausted
        wait = self.pause_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if not self.gated:
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((units, tokens, fut))
        if not self.fetching:
            self.fetching = True
            asyncio.ensure_future(self._fetch())
        await fut

    def _next_group(self) -> list[tuple[int, float, asyncio.Future]]:
        """Prepaid (0-unit) waiters first: finishing started rows beats starting new ones."""
        units = 0 if any(w[0] == 0 for w in self.waiters) else self.waiters[0][0]
        return [w for w in self.waiters if w[0] == units]

    async def _fetch(self) -> None:
        try:
            while self.waiters:
                group = self._next_group()
                units = group[0][0]
                res = await self._call("acquire", [w[1] for w in group], self.cost_each * units)
                if res["budget_stop"]:
                    self.stopped = True
                    for _, _, f in group:
                        f.set_exception(BudgetExhausted())
                    gone = {id(w) for w in group}
                    self.waiters = [w for w in self.waiters if id(w) not in gone]
                    continue
                granted = group[: res["granted"]]
                gone = {id(w) for w in granted}
                self.waiters = [w for w in self.waiters if id(w) not in gone]
                for _, _, f in granted:
                    f.set_result(None)
                if res["wait_s"] > 0:
                    await asyncio.sleep(min(res["wait_s"], 1.0))
        except Exception as e:  # the actor died: fail the waiters loudly rather than hang
            for _, _, f in self.waiters:
                if not f.done():
                    f.set_exception(e)
            self.waiters.clear()
        finally:
            self.fetching = False

    def done(self, cost_usd: float, release_units: int, tokens_over_estimate: float = 0.0) -> None:
        """A request finished (ok or not): release `release_units` of reservation, charge what it cost,
        and correct the TPM charge by what it used beyond (or short of) its estimate."""
        if tokens_over_estimate:
            self.delta["tpm_correction"] += tokens_over_estimate
        if self.gated and release_units:
            self.delta["released_usd"] += self.cost_each * release_units
            if self.waiters and not self.flush_soon:  # someone may be waiting for exactly this money
                self.flush_soon = True
                asyncio.get_running_loop().call_later(0.02, lambda: asyncio.ensure_future(self._flush_now()))
        self.delta["cost_usd"] += cost_usd

    async def _flush_now(self) -> None:
        self.flush_soon = False
        try:
            await self.flush()
        except Exception:
            pass  # the periodic flush will carry it

    async def pause(self, seconds: float) -> None:
        self.pause_until = max(self.pause_until, time.monotonic() + seconds)
        await self._call("pause", seconds)

    async def flush(self) -> None:
        if not self.delta:
            return
        delta = dict(self.delta)
        self.delta.clear()  # in place: the client holds a reference to this Counter
        res = await self._call("report", delta)
        if res["pause_s"] > 0:  # another worker got a 429: respect the job-wide pause here too
            self.pause_until = max(self.pause_until, time.monotonic() + res["pause_s"])
        if res["budget_stop"]:
            self.stopped = True
