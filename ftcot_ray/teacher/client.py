"""Asking the teacher: AsyncOpenAI calls with a cache, permits, retries, backoff and accounting.

One `TeacherClient` per worker keeps many requests in flight on one event loop (a semaphore of
`teacher.concurrency`). Every answered sample is cached at once; a sample found in the cache is
never asked again. Retries: 429 (obeying Retry-After, job-wide), 5xx, timeouts, connection errors
and malformed bodies, with jittered exponential backoff, at most `teacher.max_attempts` attempts;
then the step returns its error and the job goes on. 400/401/403/404 are not retried.

The sample index travels as the OpenAI `seed` parameter (`teacher.seed_param`), so D samples of a
question are distinct, reproducible requests; with `teacher.use_n` one request asks for several
contiguous samples with `n` (seed = the first; choice i is sample seed + i).
Keys: read from the environment by the caller, never logged; `redact` scrubs them from messages.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from .cache import AnswerCache, request_key
from .limiter import BudgetExhausted, Permits

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class TeacherSetupError(ValueError):
    """The teacher cannot be used at all (bad key, unreachable endpoint, missing variable): fail fast."""


class Secret:
    """An API key that never shows itself in reprs, logs, tracebacks or pickled-arg listings."""

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def redact(text: str, secret: Optional[Secret]) -> str:
    key = secret.get() if secret else ""
    return text.replace(key, "***") if key and len(key) >= 4 else text


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
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=secret.get(), max_retries=0, timeout=timeout_s)
    try:
        return [m.id for m in client.models.list().data]
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        # The provider's message may echo part of the key: say it in our words only.
        raise TeacherSetupError(
            f"the teacher at {base_url} rejected the API key from ${env_name} (HTTP {e.status_code}); "
            f"check that variable"
        ) from None
    except openai.APIConnectionError as e:
        cause = type(e.__cause__).__name__ if e.__cause__ else type(e).__name__
        raise TeacherSetupError(f"cannot reach the teacher at {base_url} ({cause}); check teacher.base_url") from None
    except openai.NotFoundError:
        return []  # some OpenAI-compatible servers have no /models: not fatal
    finally:
        client.close()


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
        return cls(text=d["text"], finish_reason=d.get("finish_reason"), prompt_tokens=d.get("prompt_tokens", 0),
                   completion_tokens=d.get("completion_tokens", 0), cost_usd=d.get("cost_usd", 0.0),
                   attempts=0, cached=True)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class TeacherClient:
    def __init__(self, tcfg: Any, *, base_url: str, endpoint_id: str, secret: Secret,
                 cache: Optional[AnswerCache], permits: Permits):
        self.t = tcfg
        self.base_url, self.endpoint_id, self.secret = base_url, endpoint_id, secret
        self.cache, self.permits = cache, permits
        price = tcfg.prices.get(tcfg.model)
        self.price_in = price.input / 1e6 if price else 0.0
        self.price_out = price.output / 1e6 if price else 0.0
        self.sem = asyncio.Semaphore(tcfg.concurrency)
        self.delta = permits.delta  # one counter dict per worker, flushed to the job's gate
        import httpx
        import openai

        # Keep-alive for every slot: re-opening sockets at 256 in flight costs more than the requests.
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=tcfg.concurrency + 8,
                                                     max_keepalive_connections=tcfg.concurrency + 8),
                                 timeout=tcfg.timeout_s)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=secret.get(), max_retries=0,
                                         timeout=tcfg.timeout_s, http_client=http)

    # ------------------------------------------------------------------ keys and cost

    def params(self, max_tokens: int) -> dict:
        return {"temperature": self.t.temperature, "top_p": self.t.top_p, "max_tokens": max_tokens}

    def key(self, payload: Any, max_tokens: int, sample: int) -> str:
        return request_key(self.endpoint_id, self.t.api, self.t.model, payload, self.params(max_tokens), sample)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.price_in + completion_tokens * self.price_out

    # ------------------------------------------------------------------ one step, several samples

    async def step(self, payload: Any, samples: list[int], max_tokens: int, *, first_step: bool = True,
                   prepaid: bool = False) -> dict[int, StepResult]:
        """Answers for `samples` of one prompt (str) or chat (list of messages): cache first, then the API.

        Budget units (see `Permits`): a fresh step 1 reserves 2 per sample and keeps 1 for its step 2;
        a `prepaid` step 2 reserves nothing more and releases that kept unit when it is done.
        """
        out: dict[int, StepResult] = {}
        missing = []
        for s in samples:
            hit = self.cache.get(self.key(payload, max_tokens, s)) if self.cache is not None else None
            if hit is not None:
                out[s] = StepResult.from_cache(hit)
                self.delta["cache_hits"] += 1
            else:
                missing.append(s)
        if missing:
            contiguous = missing == list(range(missing[0], missing[0] + len(missing)))
            groups = [missing] if self.t.use_n and len(missing) > 1 and contiguous else [[s] for s in missing]
            per = 2 if first_step else (0 if prepaid else 1)
            for res in await asyncio.gather(*(self._ask(payload, g, max_tokens, units=per * len(g),
                                                        keep=len(g) if first_step else 0) for g in groups)):
                out.update(res)
        if prepaid:
            self.permits.done(0.0, len(samples))
        return out

    async def _ask(self, payload: Any, samples: list[int], max_tokens: int, units: int, keep: int) -> dict[int, StepResult]:
        last_error = "not attempted"
        for attempt in range(1, self.t.max_attempts + 1):
            try:
                # Permit first, then a slot: a request waiting for budget must not sit on a slot that
                # a prepaid step 2 needs to finish (and free) its reservation.
                await self.permits.acquire(units)
                async with self.sem:
                    try:
                        results = await self._request(payload, samples, max_tokens)
                    except BaseException:
                        self.permits.done(0.0, units)
                        raise
                self.permits.done(sum(r.cost_usd for r in results.values()), units - keep)
            except BudgetExhausted:
                return {s: StepResult(attempts=attempt - 1, error=(
                    f"budget: not sent, teacher.budget_usd={self.t.budget_usd} would be exceeded")) for s in samples}
            except _Retryable as e:
                last_error = str(e)
                self.delta["failed_requests"] += 1
                if attempt == self.t.max_attempts:
                    break
                self.delta["retries"] += 1
                wait = self._backoff(attempt)
                if e.retry_after is not None:
                    wait = max(wait, e.retry_after)
                    await self.permits.pause(e.retry_after)
                await asyncio.sleep(wait)
                continue
            except _Fatal as e:
                self.delta["failed_requests"] += 1
                return {s: StepResult(attempts=attempt, error=str(e)) for s in samples}
            for s, r in results.items():
                r.attempts = attempt
                if self.cache is not None:
                    self.cache.put(self.key(payload, max_tokens, s), r.to_cache())
            return results
        return {s: StepResult(attempts=self.t.max_attempts,
                              error=f"gave up after {self.t.max_attempts} attempts: {last_error}") for s in samples}

    def _backoff(self, attempt: int) -> float:
        cap = min(self.t.backoff_max_s, self.t.backoff_base_s * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": never ~0, never in lockstep

    async def _request(self, payload: Any, samples: list[int], max_tokens: int) -> dict[int, StepResult]:
        import openai

        kw: dict[str, Any] = {"model": self.t.model, "temperature": self.t.temperature, "top_p": self.t.top_p,
                              "max_tokens": max_tokens}
        if len(samples) > 1:
            kw["n"] = len(samples)
        if self.t.seed_param:
            kw["seed"] = samples[0]
        self.delta["requests"] += 1
        try:
            if self.t.api == "chat":
                r = await self.client.chat.completions.create(messages=payload, **kw)
                texts = {c.index: (c.message.content or "", c.finish_reason) for c in r.choices}
            else:
                r = await self.client.completions.create(prompt=payload, **kw)
                texts = {c.index: (c.text, c.finish_reason) for c in r.choices}
            if len(texts) != len(samples):
                raise _Retryable(f"malformed response: {len(texts)} choices for n={len(samples)}")
            pt = r.usage.prompt_tokens if r.usage else 0
            ct = r.usage.completion_tokens if r.usage else 0
        except openai.RateLimitError as e:
            raise _Retryable("429 rate limited", _retry_after(e.response)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise _Fatal(f"HTTP {e.status_code}: the teacher rejected the API key") from None
        except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError) as e:
            raise _Fatal(redact(f"HTTP {e.status_code}: {_message(e)}", self.secret)) from None
        except openai.APITimeoutError:
            raise _Retryable(f"timeout after {self.t.timeout_s:g}s") from None
        except openai.APIStatusError as e:
            raise _Retryable(redact(f"HTTP {e.status_code}: {_message(e)}", self.secret)) from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"connection error: {type(e.__cause__ or e).__name__}") from None
        except (json.JSONDecodeError, openai.APIResponseValidationError, AttributeError, KeyError, TypeError,
                ValueError) as e:
            raise _Retryable(f"malformed response: {type(e).__name__}") from None
        self.delta["prompt_tokens"] += pt
        self.delta["completion_tokens"] += ct
        # Usage is per request: with n > 1 the prompt is billed once (on the first sample) and the
        # completion tokens are split evenly (the API does not say which choice used how many).
        k = len(samples)
        out = {}
        for i, s in enumerate(samples):
            p_i = pt if i == 0 else 0
            c_i = ct // k + (ct % k if i == 0 else 0)
            out[s] = StepResult(text=texts[i][0], finish_reason=texts[i][1], prompt_tokens=p_i,
                                completion_tokens=c_i, cost_usd=self.cost(p_i, c_i))
        return out

    async def close(self) -> None:
        await self.client.close()


class _Fatal(Exception):
    """Not worth retrying (bad request, unknown model, rejected key): the row records it."""


def _retry_after(response: Any) -> Optional[float]:
    try:
        value = response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _message(e: Any) -> str:
    """The server's error message, short (OpenAI's shape: {"error": {"message": ...}})."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(e, "message", e))[:300]
