"""One OpenAI-compatible caller for the whole project: the teacher, the eval baselines, Serve's tests.

An `Endpoint` is one pooled HTTP client (aiohttp, keep-alive, `concurrency` slots) that posts JSON
and reads back only the fields we use: the choices' text and finish reason, and the usage. Chat vs
completions is decided here and nowhere else (`request_body`, `parse_reply`), and so is the retry
policy:

* retried, with jittered exponential backoff, up to `max_attempts` attempts: 429 (waiting at least
  its Retry-After, which a `Gate` can turn into a job-wide pause), 408, 409, 5xx, timeouts,
  connection errors and malformed bodies;
* not retried: 400, 401, 403, 404, 422 and any other 4xx (the request itself is wrong);
* a call that ends without an answer raises `CallError` (its message redacted of the key), so
  callers write an error row instead of losing a question.

Why not the openai SDK here: measured on this machine against the same 100 ms local server at 64
in flight, `AsyncOpenAI` spent about 10 ms of CPU per request (httpx and the SDK's typed models),
a pooled aiohttp session 0.35 ms (565 vs 59 req/s); the fan-out is bound by client CPU, not the
server. The SDK stays a dependency: the tests use the stock client to check our servers speak its
protocol. aiohttp is already installed with Ray.

Keys: `Secret` never shows itself; `redact` scrubs it from any message we keep.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol, TypeVar

from . import __version__

T = TypeVar("T")
RETRIED_STATUS = {408, 409, 429}  # and every 5xx
JSON_HEADERS = {"Content-Type": "application/json"}


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


# --------------------------------------------------------------------------- the wire format


def api_path(api: str) -> str:
    return "/chat/completions" if api == "chat" else "/completions"


def request_body(api: str, model: str, payload: Any, *, max_tokens: int, temperature: float,
                 top_p: Optional[float] = None, n: int = 1, seed: Optional[int] = None,
                 stop: Optional[list[str]] = None) -> dict:
    """The JSON body of one request: `payload` is a prompt (completions) or a message list (chat);
    a plain string sent to the chat API becomes one user message."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": payload}] if isinstance(payload, str) else payload
    else:
        body["prompt"] = payload
    if top_p is not None:
        body["top_p"] = top_p
    if n > 1:
        body["n"] = n
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    return body


@dataclass
class Reply:
    """What we read from a completion: (text, finish_reason) per choice, in index order, and usage."""

    choices: list[tuple[str, Optional[str]]]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


def parse_reply(api: str, raw: bytes | dict, n: int = 1) -> Reply:
    """A 200 body -> Reply; `Retryable` when it is not a complete completion (truncated, wrong shape)."""
    try:
        data = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        got = []
        for i, c in enumerate(data["choices"]):
            text = (c["message"].get("content") or "") if api == "chat" else c["text"]
            if not isinstance(text, str):
                raise TypeError("choice text is not a string")
            got.append((c.get("index", i), text, c.get("finish_reason")))
        usage = data.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Retryable(f"malformed response: {type(e).__name__}") from None
    if len(got) != n:
        raise Retryable(f"malformed response: {len(got)} choices for n={n}")
    return Reply([(t, f) for _, t, f in sorted(got, key=lambda x: x[0])], pt, ct)


def error_message(raw: bytes) -> str:
    """The server's error message, short (OpenAI's shape: {"error": {"message": ...}})."""
    try:
        body = json.loads(raw)
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])[:300]
    except (ValueError, AttributeError, TypeError):
        pass
    return raw[:300].decode("utf-8", "replace") or "(no body)"


def retry_after_s(headers: Any) -> Optional[float]:
    """Seconds from `retry-after-ms` or `retry-after` (seconds; an HTTP date counts as 1 s)."""
    try:
        if headers.get("retry-after-ms") is not None:
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return 1.0
    except (AttributeError, TypeError, ValueError):
        return None


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """'Equal jitter': half the exponential step fixed, half random; never ~0, never in lockstep."""
    step = min(cap, base * 2 ** (attempt - 1))
    return step / 2 + random.uniform(0, step / 2)


class Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


class Fatal(Exception):
    """Not worth retrying (bad request, unknown model, rejected key)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class CallError(Exception):
    """A call that ended without an answer: after its last attempt, or at once when not retryable."""

    def __init__(self, message: str, attempts: int, status: Optional[int] = None, retryable: bool = True):
        super().__init__(message)
        self.attempts, self.status, self.retryable = attempts, status, retryable


def check_status(status: int, headers: Any, raw: bytes, secret: Optional[Secret]) -> None:
    """Raise the retry policy's verdict for a non-2xx answer."""
    if 200 <= status < 300:
        return
    if status in (401, 403):  # the provider's message may echo part of the key: say it in our words only
        raise Fatal(f"HTTP {status}: the endpoint rejected the API key", status)
    message = redact(f"HTTP {status}: {error_message(raw)}", secret)
    if status in RETRIED_STATUS or status >= 500:
        raise Retryable(message, retry_after_s(headers) if status == 429 else None, status)
    raise Fatal(message, status)


# --------------------------------------------------------------------------- the client


class Gate(Protocol):
    """What a caller may wrap around each attempt (the teacher's rate limits and budget)."""

    async def enter(self) -> None: ...  # before an attempt takes a slot; may raise to stop the call

    def leave(self, reply: Optional[Reply]) -> None: ...  # after it, with its reply or None

    async def pause(self, seconds: float) -> None: ...  # a 429's Retry-After


class Endpoint:
    """A pooled client for one base URL. Create and use it on one event loop; `close()` at the end."""

    def __init__(self, base_url: str, secret: Optional[Secret] = None, *, api: str = "completions",
                 model: Optional[str] = None, concurrency: int = 16, timeout_s: float = 60.0, max_attempts: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, counters: Optional[Counter] = None):
        self.base_url = base_url.rstrip("/")
        self.secret, self.api, self.model = secret, api, model
        self.concurrency, self.timeout_s, self.max_attempts = concurrency, timeout_s, max_attempts
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.counters = counters if counters is not None else Counter()  # requests, failed_requests, retries
        self._session = None
        self._slots: Optional[asyncio.Semaphore] = None

    @classmethod
    def from_config(cls, cfg: Any, secret: Optional[Secret], *, base_url: Optional[str] = None,
                    concurrency: Optional[int] = None, counters: Optional[Counter] = None) -> "Endpoint":
        """From an `EndpointConfig` (or the teacher's config, which is one); `base_url` overrides."""
        return cls(base_url or cfg.base_url, secret, api=cfg.api, model=cfg.model,
                   concurrency=concurrency or cfg.concurrency, timeout_s=cfg.timeout_s, max_attempts=cfg.max_attempts,
                   backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s, counters=counters)

    def _open(self):
        if self._session is None:
            import aiohttp

            import os

            # Who is asking, as a client says (the SDKs send theirs): the process, so one worker's traffic
            # can be told from another's in a server's logs.
            headers = {"User-Agent": f"ftcot-ray/{__version__} (pid {os.getpid()})"}
            if self.secret is not None and self.secret.get():
                headers["Authorization"] = f"Bearer {self.secret.get()}"
            # One keep-alive connection per slot: re-opening sockets at 256 in flight costs more than the requests.
            connector = aiohttp.TCPConnector(limit=self.concurrency, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "Endpoint":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ one attempt

    async def send(self, method: str, path: str, *, body: Optional[dict] = None, data: Any = None,
                   timeout_s: Optional[float] = None) -> bytes:
        """One attempt: the response body of a 2xx; `Retryable` / `Fatal` otherwise."""
        import aiohttp

        session = self._open()
        kw: dict[str, Any] = {}
        if body is not None:
            kw["data"] = json.dumps(body, ensure_ascii=False).encode()
            kw["headers"] = JSON_HEADERS
        elif data is not None:
            kw["data"] = data  # a form: aiohttp writes its multipart Content-Type
        if timeout_s is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        self.counters["requests"] += 1
        try:
            async with session.request(method, self.base_url + path, **kw) as resp:
                raw = await resp.read()
                check_status(resp.status, resp.headers, raw, self.secret)
                return raw
        except asyncio.TimeoutError:
            raise Retryable(f"timeout after {timeout_s or self.timeout_s:g}s") from None
        except aiohttp.ClientError as e:
            # The URL names the endpoint a person has to check; the key is never in it (it is a header).
            raise Retryable(f"connection error to {self.base_url}{path} ({type(e).__name__})") from None

    # ------------------------------------------------------------------ with the retry policy

    async def call(self, method: str, path: str, *, body: Optional[dict] = None,
                   data: Optional[Callable[[], Any]] = None, parse: Callable[[bytes], T] = json.loads,
                   gate: Optional[Gate] = None, timeout_s: Optional[float] = None,
                   on_send: Optional[Callable[[], None]] = None) -> tuple[T, int]:
        """(parsed body, attempts) of a call, retried per the policy above; `CallError` when it fails.

        `data` makes a fresh form per attempt (a multipart body cannot be sent twice). `gate.enter()`
        runs before each attempt takes a slot: a request waiting for a permit must not hold a slot.
        `on_send()` runs once a slot is held, right before the request goes on the wire.
        """
        last: Optional[Retryable] = None
        for attempt in range(1, self.max_attempts + 1):
            if gate is not None:
                await gate.enter()
            left = False
            try:
                async with self._slot():
                    if on_send is not None:
                        on_send()
                    raw = await self.send(method, path, body=body, data=data() if data else None, timeout_s=timeout_s)
                    result = parse(raw)
                    if gate is not None:
                        left = True
                        gate.leave(result if isinstance(result, Reply) else None)
                    return result, attempt
            except Retryable as e:
                last = e
            except Fatal as e:
                self.counters["failed_requests"] += 1
                raise CallError(str(e), attempt, e.status, retryable=False) from None
            finally:
                if gate is not None and not left:
                    gate.leave(None)  # failed, or cancelled: release what the attempt held
            self.counters["failed_requests"] += 1
            if attempt == self.max_attempts:
                break
            self.counters["retries"] += 1
            wait = backoff_s(attempt, self.backoff_base_s, self.backoff_max_s)
            if last.retry_after is not None:
                wait = max(wait, last.retry_after)
                if gate is not None:
                    await gate.pause(last.retry_after)
            await asyncio.sleep(wait)
        raise CallError(f"gave up after {self.max_attempts} attempts: {last}", self.max_attempts, last.status)

    def _slot(self):
        self._open()
        return self._slots

    async def complete(self, payload: Any, *, max_tokens: int, temperature: float, top_p: Optional[float] = None,
                       n: int = 1, seed: Optional[int] = None, stop: Optional[list[str]] = None,
                       gate: Optional[Gate] = None, on_send: Optional[Callable[[], None]] = None) -> Reply:
        """One completion (chat or completions per `api`), retried; `CallError` when it fails."""
        body = request_body(self.api, self.model, payload, max_tokens=max_tokens, temperature=temperature,
                            top_p=top_p, n=n, seed=seed, stop=stop)
        reply, attempts = await self.call("POST", api_path(self.api), body=body,
                                          parse=lambda raw: parse_reply(self.api, raw, n), gate=gate,
                                          on_send=on_send)
        reply.attempts = attempts
        return reply

    async def models(self) -> list[str]:
        """GET /models: the ids the endpoint serves."""
        data, _ = await self.call("GET", "/models")
        return [m.get("id") for m in data.get("data") or [] if isinstance(m, dict)]


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine from sync code, also where this thread already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=target, name="ftcot-endpoint")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
