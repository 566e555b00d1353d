"""The shared OpenAI-compatible caller (ftcot_ray/endpoint.py) over real HTTP on 127.0.0.1: the wire
format of both APIs, the one retry policy, Retry-After, key redaction, and the gate around attempts."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ftcot_ray.config import TeacherSimConfig
from ftcot_ray.endpoint import CallError, Endpoint, Secret, redact, request_body, run_sync
from ftcot_ray.prompts import chat_messages, reasoning_prompt
from ftcot_ray.teacher.sim import running_sim

from helpers_teacher import register_add_task

KEY = "sk-endpoint-secret-777"
OK = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": " fine.", "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 7, "completion_tokens": 2}}


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, body, headers); records what it was sent."""

    script: list = []
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                                "at": time.time()})
        status, payload, headers = type(self).script.pop(0) if type(self).script else (200, OK, {})
        if status == "hang":
            time.sleep(payload)
            status, payload, headers = 200, OK, {}
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def server(port):
    Scripted.script, Scripted.seen = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", port), Scripted)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/v1"
    srv.shutdown()
    srv.server_close()


def call(url: str, script: list, **kw) -> tuple:
    Scripted.script = list(script)

    async def go():
        ep = Endpoint(url, Secret(KEY), **{"max_attempts": 4, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
                                           "timeout_s": 5, **kw})
        try:
            return await ep.complete("Q: x\nA:", max_tokens=8, temperature=0.0), ep.counters
        finally:
            await ep.close()

    try:
        reply, counters = asyncio.run(go())
        return reply, counters, None
    except CallError as e:
        return None, None, e


def test_chat_and_completions_speak_the_same_protocol_to_the_sim():
    register_add_task()
    with running_sim(TeacherSimConfig(error_rate=0.0)) as url:
        async def go():
            async with Endpoint(url, Secret("x"), api="completions", model="m") as c, \
                       Endpoint(url, Secret("x"), api="chat", model="m") as chat:
                q = "What is 2 plus 3?"
                r1 = await c.complete(reasoning_prompt(q), max_tokens=64, temperature=0.7, n=3, seed=5)
                r2 = await chat.complete(chat_messages(q), max_tokens=64, temperature=0.7, seed=5)
                return r1, r2, await c.models()

        r1, r2, models = asyncio.run(go())
    assert len(r1.choices) == 3 and all(f == "stop" for _, f in r1.choices) and r1.prompt_tokens > 0
    assert r2.choices[0][0] == r1.choices[0][0].strip()  # the same sample, seeded alike, through the chat API
    assert models == ["ftcot-sim-teacher"]
    body = request_body("chat", "m", "plain text", max_tokens=3, temperature=0, stop=["\n"])
    assert body["messages"] == [{"role": "user", "content": "plain text"}] and body["stop"] == ["\n"]
    assert "n" not in body and "seed" not in body


def test_retry_after_is_waited_5xx_and_malformed_are_retried(server):
    reply, counters, err = call(server, [(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.4"}),
                                         (503, {"error": {"message": "busy"}}, {}),
                                         (200, b'{"choices": [{"text": "cut', {})])
    assert err is None and reply.choices == [(" fine.", "stop")] and reply.attempts == 4
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 2)
    assert Scripted.seen[1]["at"] - Scripted.seen[0]["at"] >= 0.4  # Retry-After, not the 10 ms backoff
    assert counters["requests"] == 4 and counters["retries"] == 3 and counters["failed_requests"] == 3
    assert {s["auth"] for s in Scripted.seen} == {f"Bearer {KEY}"}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(server, status):
    _, _, err = call(server, [(status, {"error": {"message": f"no good, {KEY}"}}, {})])
    assert err is not None and err.status == status and err.attempts == 1 and not err.retryable
    assert len(Scripted.seen) == 1 and KEY not in str(err)  # the key never comes back in a message
    if status in (401, 403):
        assert "rejected the API key" in str(err)
    else:
        assert "no good, ***" in str(err)


def test_gives_up_after_max_attempts_and_times_out_hangs(server):
    _, _, err = call(server, [(500, {"error": {"message": "boom"}}, {})] * 3, max_attempts=3)
    assert str(err) == "gave up after 3 attempts: HTTP 500: boom" and err.attempts == 3 and err.status == 500
    reply, _, err = call(server, [("hang", 1.5, {})], timeout_s=0.5)
    assert err is None and reply.attempts == 2  # the hung attempt timed out, the retry answered


def test_connection_refused_is_a_clear_error(port):
    _, _, err = call(f"http://127.0.0.1:{port}/v1", [], max_attempts=2)
    assert err.status is None and "connection error" in str(err) and err.attempts == 2


def test_gate_wraps_every_attempt_and_hears_retry_after(server):
    events = []

    class Gate:
        async def enter(self):
            events.append("enter")

        def leave(self, reply):
            events.append("ok" if reply else "failed")

        async def pause(self, seconds):
            events.append(f"pause {seconds:g}")

    Scripted.script = [(429, {}, {"Retry-After": "0.05"}), (200, OK, {})]

    async def go():
        async with Endpoint(server, None, backoff_base_s=0.01) as ep:
            return await ep.complete("p", max_tokens=1, temperature=0, gate=Gate())

    asyncio.run(go())
    assert events == ["enter", "failed", "pause 0.05", "enter", "ok"]
    assert Scripted.seen[0]["auth"] is None  # no key, no header


def test_run_sync_works_inside_a_running_loop_and_secrets_stay_hidden(server):
    async def inner():
        return run_sync(lambda: asyncio.sleep(0, result=42))

    assert asyncio.run(inner()) == 42
    s = Secret(KEY)
    assert KEY not in repr(s) and redact(f"x {KEY} y", s) == "x *** y"
