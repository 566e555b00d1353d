"""teacher-sim's server: a bare ASGI app; what it answers with lives in sources.py and batches.py.

Routes: ``GET /health``; ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions``
(JSON, or server-sent events with ``"stream": true``); the Files and Batch API (``POST /v1/files``,
``GET /v1/files/{id}[/content]``, ``DELETE /v1/files/{id}``, ``POST|GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``); ``GET /stats`` and
``POST /stats/reset`` for tests (the observer's own calls are not counted).

Fault injection on the completion routes, each at its own rate per request: 429 with Retry-After,
500, a hang longer than the client's timeout, a malformed (non-JSON) 200 body; plus a fixed
latency. A bare ASGI app under uvicorn (uvloop + httptools) because the benchmarks share two cores
with it, and a framework's per-request cost would show up in the client's numbers.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import os
import random
import time
from typing import Any, Optional

from ...errors import ConfigError
from .batches import Batches, Files
from .sources import MODEL_DESCRIPTION, SIM_MODEL, BadRequest, Responder, error_body
from .stats import SimStats

COMPLETION_ROUTES = ("/v1/completions", "/v1/chat/completions")


class SimApp:
    def __init__(self, settings: Any, model: str = SIM_MODEL):
        self.s, self.model = settings, model
        self.stats = SimStats()
        self.fault_rng = random.Random(settings.seed + 1)
        self.responder = Responder(settings, model)
        self.files = Files()
        self.batches = Batches(settings, self.files, self.responder, self.stats)
        self.key: Optional[str] = None
        if settings.require_key_env:
            self.key = os.environ.get(settings.require_key_env, "")
            if not self.key:
                raise ConfigError(f"teacher-sim require_key_env={settings.require_key_env}: that environment "
                                  "variable is not set")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        body = await _read_body(receive)
        if path == "/stats":
            full = b"full=1" in scope.get("query_string", b"")
            return await send_json(send, 200, self.stats.to_json(full, self.batches.summary()))
        if path == "/stats/reset" and method == "POST":
            self.stats.reset()
            return await send_json(send, 200, {"reset": True})
        if path == "/health":
            return await send_json(send, 200, {"status": "ok", "model": self.model})
        self.stats.requests[_route_name(path)] += 1
        self.stats.last_request_at = time.time()
        if self.key is not None and not self._authorized(scope):
            return await send_json(send, 401, error_body("Incorrect API key provided.", code="invalid_api_key"))
        if path in COMPLETION_ROUTES and method == "POST":
            self.stats.log_request(_header(scope, b"user-agent"))
            self.stats.in_flight += 1
            try:
                return await self._generate(path, body, receive, send)
            finally:
                self.stats.in_flight -= 1
        status, obj = self._api(method, path, body, scope)
        if isinstance(obj, bytes):
            return await send_raw(send, status, obj, content_type=b"application/jsonl")
        return await send_json(send, status, obj)

    def _authorized(self, scope) -> bool:
        for k, v in scope["headers"]:
            if k == b"authorization":
                return v.decode() == f"Bearer {self.key}"
        return False

    # ------------------------------------------------------------------ models, files, batches

    def _api(self, method: str, path: str, body: bytes, scope) -> tuple[int, Any]:
        parts = path.split("/")[1:]  # ["v1", "files", id, "content"]
        if path == "/v1/models" and method == "GET":
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                     "owned_by": "ftcot-ray", "description": MODEL_DESCRIPTION,
                                                     "mode": self.s.mode}]}
        if parts[:2] == ["v1", "files"]:
            return self._files(method, parts[2:], body, scope)
        if parts[:2] == ["v1", "batches"]:
            rest = parts[2:]
            if method == "POST" and not rest:
                req = _json_or_none(body)
                return (400, error_body("bad request: body is not JSON")) if req is None else self.batches.create(req)
            if method == "GET" and not rest:
                q = _query(scope)
                return self.batches.list(q.get("after"), int(q.get("limit", 20)))
            if method == "GET" and len(rest) == 1:
                return self.batches.get(rest[0])
            if method == "POST" and len(rest) == 2 and rest[1] == "cancel":
                return self.batches.cancel(rest[0])
        return 404, error_body(f"no route {method} {path}")

    def _files(self, method: str, rest: list[str], body: bytes, scope) -> tuple[int, Any]:
        if method == "POST" and not rest:
            fields = _multipart(scope, body)
            if "file" not in fields:
                return 400, error_body("bad request: multipart form with a 'file' field expected")
            name, content = fields["file"]
            self.stats.files_uploaded += 1
            return 200, self.files.add(name or "upload.jsonl", (fields.get("purpose") or (None, b"batch"))[1].decode(),
                                       content)
        fid = rest[0] if rest else None
        if fid not in self.files.meta:
            return 404, error_body(f"no such file: {fid}")
        if method == "GET" and len(rest) == 1:
            return 200, self.files.meta[fid]
        if method == "GET" and rest[1:] == ["content"]:
            return 200, self.files.content[fid]
        if method == "DELETE" and len(rest) == 1:
            self.files.delete(fid)
            return 200, {"id": fid, "object": "file", "deleted": True}
        return 404, error_body(f"no route {method} /v1/files/{'/'.join(rest)}")

    # ------------------------------------------------------------------ completions

    async def _generate(self, path: str, body: bytes, receive, send) -> None:
        chat = path.endswith("chat/completions")
        req = _json_or_none(body)
        if not isinstance(req, dict):
            return await send_json(send, 400, error_body("bad request: body is not a JSON object"))
        fault = self._roll_fault()
        wait = self.s.hang_s if fault == "timeout" else self.s.latency_ms / 1000
        gone = None
        if wait > 0:
            gone = asyncio.ensure_future(receive())  # resolves only when the client disconnects
            await asyncio.sleep(wait)
        try:
            if gone is not None and gone.done():
                self.stats.abandoned += 1
                return
            if fault:
                self.stats.faults[fault] += 1
                return await self._send_fault(send, fault)
            try:
                response, keys, prompt = self.responder.respond(chat, req)
            except BadRequest as e:
                return await send_json(send, 400, error_body(str(e)))
            if req.get("stream"):
                await send_sse(send, response, chat, bool((req.get("stream_options") or {}).get("include_usage")))
            else:
                await send_json(send, 200, response)
            self.stats.answered(keys, prompt)
        finally:
            if gone is not None:
                gone.cancel()

    def _roll_fault(self) -> Optional[str]:
        if self.s.fail_429_at is not None and self.stats.completion_requests == self.s.fail_429_at:
            return "429"  # the scripted one: the N-th completion request
        u = self.fault_rng.random()
        for name, rate in (("429", self.s.rate_429), ("500", self.s.rate_500),
                           ("timeout", self.s.rate_timeout), ("malformed", self.s.rate_malformed)):
            if u < rate:
                return name
            u -= rate
        return None

    async def _send_fault(self, send, fault: str) -> None:
        if fault == "429":
            body = error_body("Rate limit reached (simulated).", "rate_limit_error", "rate_limit_exceeded")
            return await send_json(send, 429, body, [(b"retry-after", f"{self.s.retry_after_s:g}".encode())])
        if fault == "malformed":
            return await send_raw(send, 200, b'{"id": "cmpl-broken", "choices": [{"text": "trunc')
        # "500", and a "timeout" whose client is still there after hanging
        return await send_json(send, 500, error_body("The server had an error (simulated).", "server_error"))


# --------------------------------------------------------------------------- HTTP plumbing


def _header(scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), "")


async def _lifespan(receive, send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


def _route_name(path: str) -> str:
    """Counters by route, ids folded: /v1/batches/batch_ab12 -> /v1/batches/{id}."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[2] in ("files", "batches"):
        parts[3] = "{id}"
    return "/".join(parts)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _query(scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode()))


def _multipart(scope, body: bytes) -> dict[str, tuple[Optional[str], bytes]]:
    """{field: (filename, bytes)} of a multipart/form-data body (the stdlib's MIME parser does it)."""
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if not ctype.startswith(b"multipart/form-data"):
        return {}
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        return {}
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in msg.iter_parts()}


async def send_json(send, status: int, obj: dict, headers: list | None = None) -> None:
    await send_raw(send, status, json.dumps(obj).encode(), headers)


async def send_raw(send, status: int, body: bytes, headers: list | None = None,
                   content_type: bytes = b"application/json") -> None:
    hdrs = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def send_sse(send, response: dict, chat: bool, include_usage: bool) -> None:
    """The response as OpenAI-style server-sent events: text in word-sized deltas, then [DONE]."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    base = {"id": response["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": response["created"], "model": response["model"]}

    async def event(obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

    for c in response["choices"]:
        text = c["message"]["content"] if chat else c["text"]
        pieces = [p for p in _pieces(text)] or [""]
        for j, piece in enumerate(pieces):
            delta = {"index": c["index"], "finish_reason": None}
            if chat:
                delta["delta"] = ({"role": "assistant"} if j == 0 else {}) | {"content": piece}
            else:
                delta |= {"text": piece, "logprobs": None}
            await event(base | {"choices": [delta]})
        end = {"index": c["index"], "finish_reason": c["finish_reason"]}
        end |= {"delta": {}} if chat else {"text": "", "logprobs": None}
        await event(base | {"choices": [end]})
    if include_usage:
        await event(base | {"choices": [], "usage": response["usage"]})
    await event("[DONE]")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _pieces(text: str) -> list[str]:
    """Split text into deltas of a few words, keeping every character (concatenation == text)."""
    out, start, words = [], 0, 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            words += 1
            if words % 3 == 0:
                out.append(text[start:i])
                start = i
    out.append(text[start:])
    return [p for p in out if p]
