"""Asking the teacher: the shared endpoint component plus a cache, permits and accounting.

One `TeacherClient` per worker keeps many requests in flight on one event loop (the endpoint's
slots). Every answered sample is stored at once (teacher/answers.py); a sample found among the
stored answers is never asked again. Retries, backoff and which statuses are worth retrying are the endpoint's one policy
(ftcot_ray/endpoint.py); a 429's Retry-After pauses the whole job through the gate. A call that
still fails returns its error and the job goes on (an error row, never a lost question).

The sample index travels as the OpenAI `seed` parameter (`teacher.seed_param`), so D samples of a
question are distinct, reproducible requests; with `teacher.use_n` one request asks for several
contiguous samples with `n` (seed = the first; choice i is sample seed + i).
Keys: read from the environment by the caller, never logged; `redact` scrubs them from messages.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from ..endpoint import CallError, Endpoint, Reply, Secret, redact, run_sync
from ..errors import TeacherSetupError
from .answers import AnswerIndex, AnswerLog, AnswerStore
from .limiter import BudgetExhausted, Permits
from .spec import RequestSpec

__all__ = ["Secret", "redact", "TeacherSetupError", "StepResult", "TeacherClient", "preflight", "api_key_from_env",
           "is_local"]

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def is_local(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "") in LOCAL_HOSTS


def api_key_from_env(env_name: str, base_url: str) -> Secret:
    """The key from `$env_name`; a local endpoint (vLLM, teacher-sim) may go without one."""
    value = os.environ.get(env_name, "")
    if not value:
        if is_local(base_url):
            return Secret("EMPTY")
        raise TeacherSetupError(
            f"teacher.api_key_env={env_name}: environment variable {env_name} is not set "
            f"(needed for the teacher at {base_url}); export it, or name another variable"
        )
    return Secret(value)


def preflight(base_url: str, secret: Secret, env_name: str, timeout_s: float = 10.0) -> list[str]:
    """One cheap GET /models before the fan-out: a bad key or a dead endpoint fails in seconds, clearly."""
    async def models() -> list[str]:
        async with Endpoint(base_url, secret, timeout_s=timeout_s, max_attempts=2, backoff_base_s=0.2) as ep:
            return await ep.models()

    try:
        return run_sync(models)
    except CallError as e:
        if e.status in (401, 403):  # in our words only: the provider's message may echo part of the key
            raise TeacherSetupError(f"the teacher at {base_url} rejected the API key from ${env_name} "
                                    f"(HTTP {e.status}); check that variable") from None
        if e.status == 404:
            return []  # some OpenAI-compatible servers have no /models: not fatal
        if e.status is None:
            cause = str(e).split(": ", 1)[-1]
            raise TeacherSetupError(f"cannot reach the teacher at {base_url} ({cause}); check teacher.base_url") from None
        raise TeacherSetupError(f"the teacher at {base_url} failed its first call, GET /models: {e}") from None


@dataclass
class StepResult:
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    cached: bool = False
    error: Optional[str] = None

    def to_cache(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd, "attempts": self.attempts,
                "created": time.time()}

    @classmethod
    def from_cache(cls, d: dict) -> "StepResult":
        return cls(text=d["text"], finish_reason=d.get("finish_reason"), prompt_tokens=d.get("prompt_tokens") or 0,
                   completion_tokens=d.get("completion_tokens") or 0, cost_usd=d.get("cost_usd") or 0.0,
                   attempts=0, cached=True)


def split_reply(reply: Reply, samples: list[int], price: tuple[float, float]) -> dict[int, StepResult]:
    """One reply -> a StepResult per sample. Usage is per request: with n > 1 the prompt is billed
    once (on the first sample) and the completion tokens are split evenly (the API does not say
    which choice used how many)."""
    k, pt, ct = len(samples), reply.prompt_tokens, reply.completion_tokens
    out = {}
    for i, s in enumerate(samples):
        p_i = pt if i == 0 else 0
        c_i = ct // k + (ct % k if i == 0 else 0)
        text, finish = reply.choices[i]
        out[s] = StepResult(text=text, finish_reason=finish, prompt_tokens=p_i, completion_tokens=c_i,
                            cost_usd=p_i * price[0] + c_i * price[1], attempts=reply.attempts)
    return out


class _Permit:
    """The endpoint's gate for one teacher call: a permit of `units` and an estimated `tokens` before each
    attempt (see `Permits`), released after it, `keep` units kept on success for the step 2 it prepays;
    the TPM charge is corrected by the usage the reply reports (a failed attempt gives its estimate back)."""

    def __init__(self, permits: Permits, units: int, keep: int, price: tuple[float, float], tokens: float):
        self.permits, self.units, self.keep, self.price, self.tokens = permits, units, keep, price, tokens
        self.entered = 0

    async def enter(self) -> None:
        await self.permits.acquire(self.units, self.tokens)
        self.entered += 1

    def leave(self, reply: Optional[Reply]) -> None:
        if reply is None:
            self.permits.done(0.0, self.units, -self.tokens)
        else:
            cost = reply.prompt_tokens * self.price[0] + reply.completion_tokens * self.price[1]
            used = reply.prompt_tokens + reply.completion_tokens
            self.permits.done(cost, self.units - self.keep, used - self.tokens if used else 0.0)

    async def pause(self, seconds: float) -> None:
        await self.permits.pause(seconds)


class TeacherClient:
    """One worker's way to the teacher: its stored answers first (the run's `AnswerIndex`), then the
    endpoint; every new answer goes to the worker's `AnswerLog` (journal at once, blocks as they fill)."""

    def __init__(self, tcfg: Any, *, base_url: str, endpoint_id: str, secret: Secret, permits: Permits,
                 index: Optional[AnswerIndex] = None, log: Optional[AnswerLog] = None,
                 concurrency: Optional[int] = None):
        self.t = tcfg
        self.spec = RequestSpec.of(tcfg, endpoint_id)
        self.base_url, self.secret = base_url, secret
        self.index, self.log, self.permits = index, log, permits
        self.remote_index = index is not None and len(index) > 0 and AnswerStore(index.root).remote
        price = tcfg.prices.get(tcfg.model)
        self.price = price.per_token("sync") if price else (0.0, 0.0)
        self.delta = permits.delta  # one counter dict per worker, flushed to the job's gate
        self.endpoint = Endpoint.from_config(tcfg, secret, base_url=base_url, concurrency=concurrency,
                                             counters=self.delta)
        self.seen = {1: [0, 0], 2: [0, 0]}  # completions seen per step (count, tokens): the TPM estimate

    # ------------------------------------------------------------------ stored answers

    async def stored(self, keys: list[str]) -> dict[str, dict]:
        """The stored answers among `keys` (a block read from object storage goes off the event loop)."""
        if self.index is None or len(self.index) == 0:
            return {}
        if self.remote_index:
            return await asyncio.to_thread(self.index.get_many, keys)
        return self.index.get_many(keys)

    # ------------------------------------------------------------------ one step, several samples

    async def step(self, question: str, rationale: Optional[str], samples: list[int], *,
                   prepaid: bool = False) -> dict[int, StepResult]:
        """Step 1 (`rationale` None) or step 2 of one question for `samples`: stored answers first, then
        the API (grouped by `RequestSpec.groups`).

        Budget units (see `Permits`): a fresh step 1 reserves 2 per sample and keeps 1 for its step 2;
        a `prepaid` step 2 reserves nothing more and releases that kept unit when it is done.
        """
        step_no = 1 if rationale is None else 2
        payload = self.spec.payload(question, rationale)
        keys = {s: self.spec.key(payload, step_no, s) for s in samples}
        hits = await self.stored(list(keys.values()))
        out: dict[int, StepResult] = {}
        missing = []
        for s in samples:
            hit = hits.get(keys[s])
            if hit is not None:
                out[s] = StepResult.from_cache(hit)
                self.delta["cache_hits"] += 1  # a request not sent: its answer was stored
            else:
                missing.append(s)
        if missing:
            per = 2 if step_no == 1 else (0 if prepaid else 1)
            groups = self.spec.groups(missing, step_no)
            asks = [self._ask(payload, g, [keys[x] for x in g], per * len(g), len(g) if step_no == 1 else 0, step_no)
                    for g in groups]
            # One request needs no task of its own (a task per request costs as much CPU as aiohttp's send).
            for res in ([await asks[0]] if len(asks) == 1 else await asyncio.gather(*asks)):
                out.update(res)
        if prepaid:
            self.permits.done(0.0, len(samples))
        return out

    def _estimate(self, payload: Any, step_no: int, n: int) -> float:
        count, tokens = self.seen[step_no]
        expected = tokens / count if count else None
        prompt_and_one = self.spec.estimate_tokens(payload, step_no, expected)
        return prompt_and_one + (n - 1) * (expected if expected is not None else self.spec.max_tokens_of(step_no))

    async def _ask(self, payload: Any, samples: list[int], keys: list[str], units: int, keep: int,
                   step_no: int) -> dict[int, StepResult]:
        gate = _Permit(self.permits, units, keep, self.price, self._estimate(payload, step_no, len(samples)))
        self.delta[f"step{step_no}_requests"] += 1
        log = self.log
        try:
            reply = await self.endpoint.complete(
                payload, max_tokens=self.spec.max_tokens_of(step_no), temperature=self.spec.temperature,
                top_p=self.spec.top_p, n=len(samples), seed=self.spec.seed(samples), gate=gate,
                # "on the wire": a re-run after a kill counts what it asks again
                on_send=(lambda: log.sent(keys)) if log is not None else None)
        except BudgetExhausted:
            if gate.entered == 0:
                self.delta[f"step{step_no}_requests"] -= 1  # never sent
            if log is not None:
                log.failed(keys)
            return {s: StepResult(attempts=gate.entered, error=(
                f"budget: not sent, teacher.budget_usd={self.t.budget_usd} would be exceeded")) for s in samples}
        except CallError as e:
            if log is not None:
                log.failed(keys)
            return {s: StepResult(attempts=e.attempts, error=str(e)) for s in samples}
        for name, value in (("prompt_tokens", reply.prompt_tokens), ("completion_tokens", reply.completion_tokens)):
            self.delta[name] += value
            self.delta[f"step{step_no}_{name}"] += value
        self.seen[step_no][0] += len(samples)
        self.seen[step_no][1] += reply.completion_tokens
        results = split_reply(reply, samples, self.price)
        if log is not None:
            for key, s in zip(keys, samples):
                log.answered(results[s].to_cache() | {"key": key})
        return results

    async def close(self) -> None:
        await self.endpoint.close()
