"""`ftcot teacher-sim`: a local OpenAI-compatible teacher for offline runs, tests and benchmarks.

It is NOT a language model, and says so in ``/v1/models``. Two behaviours:

* ``replay``: answers from recorded completions (the authors' ``D_*.json`` files or one of our
  completions tables). Step 1 is matched on the reasoning prompt, step 2 on the
  (reasoning prompt, rationale) pair, whatever answer trigger follows (MultiArith's file used
  " Therefore, the answer (arabic numerals) is"). Sample ``k`` of a prompt recorded ``m`` times
  is record ``k mod m``.
* ``simulated``: for the synthetic tasks (``Task.teacher_sim`` / ``Task.teacher_answer``) it writes
  a step-by-step rationale and reads its own answer back at step 2, wrong on purpose at
  ``error_rate``. Randomness is seeded from (sim seed, prompt, sample index, temperature); at
  temperature 0 the sample index is ignored, so every sample is the same (deterministic).

The sample index travels in the OpenAI ``seed`` request field (choice ``i`` of an ``n``-request
seeded ``s`` is sample ``s + i``); a request without ``seed`` gets a random sample.

Token counts are a word/punctuation regex count, not a real tokenizer.

Fault injection, each at its own rate per request: 429 with Retry-After, 500, a hang longer than
the client's timeout, a malformed (non-JSON) 200 body; plus a fixed latency. ``/stats`` counts
requests per endpoint, faults, and answers per (prompt, sample): an answer is counted only when it
was delivered to a still-connected client, so a test can assert that no prompt was answered twice.

Built on a bare ASGI app under uvicorn (uvloop + httptools): the benchmark shares two cores with
it, and a framework's per-request cost would show up in the client's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..prompts import ANSWER_TRIGGER, REASONING_TRIGGER

MODEL_DESCRIPTION = (
    "ftcot-sim-teacher: a rule-based simulator for synthetic tasks / replay of recorded completions; "
    "not a language model"
)
STEP1_MARK = f"\nA: {REASONING_TRIGGER}"
ANSWER_MARK = "Therefore, the answer"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass
class SimSettings:
    mode: str = "simulated"  # simulated | replay
    replay_path: Optional[str] = None
    model: str = "ftcot-sim-teacher"
    error_rate: float = 0.15
    seed: int = 0
    latency_ms: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    hang_s: float = 30.0  # how long a "timeout" fault hangs (longer than the client's timeout)
    rate_malformed: float = 0.0
    require_key_env: Optional[str] = None  # check `Authorization: Bearer $NAME` when set

    @classmethod
    def from_config(cls, sim_cfg: Any, model: str = "ftcot-sim-teacher", **faults: Any) -> "SimSettings":
        """From a `TeacherSimConfig` (the quickstart's local teacher)."""
        return cls(
            mode=sim_cfg.mode, replay_path=sim_cfg.replay_path, model=model, error_rate=sim_cfg.error_rate,
            seed=sim_cfg.seed, latency_ms=sim_cfg.latency_ms, **faults,
        )

    def endpoint_id(self) -> str:
        """A stable cache identity: what decides the answers, not the random port or the faults."""
        material = {"mode": self.mode, "model": self.model, "seed": self.seed}
        if self.mode == "simulated":
            material["error_rate"] = self.error_rate
        else:
            material["replay"] = Path(self.replay_path).name if self.replay_path else None
        return f"teacher-sim:{self.mode}:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- text helpers


def count_tokens(text: str) -> int:
    """Words and punctuation marks: an approximation, honest about being one (no tokenizer here)."""
    return len(_TOKEN_RE.findall(text))


def truncate_tokens(text: str, max_tokens: int) -> tuple[str, str]:
    """(text cut after `max_tokens` tokens, finish_reason): "length" when cut, like the API."""
    for i, m in enumerate(_TOKEN_RE.finditer(text)):
        if i == max_tokens:
            return text[: m.start()].rstrip(" "), "length"
    return text, "stop"


def parse_step(prompt: str) -> tuple[int, str, Optional[str]]:
    """(step, question, rationale) from a zero-shot-CoT completions prompt; ValueError otherwise."""
    if not prompt.startswith("Q: ") or STEP1_MARK not in prompt:
        raise ValueError("prompt is not of the form 'Q: ...\\nA: Let's think step by step.'")
    if prompt.endswith(STEP1_MARK):
        return 1, prompt[3 : -len(STEP1_MARK)], None
    head, _, rest = prompt.partition(STEP1_MARK)
    cut = rest.rfind(ANSWER_MARK)
    if cut < 0:
        raise ValueError(f"step-2 prompt has no {ANSWER_MARK!r} trigger")
    return 2, head[3:], rest[:cut].rstrip(" \n")


def parse_chat(messages: list[dict]) -> tuple[int, str, Optional[str]]:
    """The two-turn chat of `prompts.chat_messages` -> (step, question, rationale)."""
    if not messages or messages[0].get("role") != "user":
        raise ValueError("chat must start with the user's 'Q: ...' turn")
    step, question, _ = parse_step(str(messages[0].get("content", "")))
    if len(messages) == 1:
        return 1, question, None
    if len(messages) == 3 and messages[1].get("role") == "assistant" and ANSWER_MARK in str(messages[2].get("content")):
        return 2, question, str(messages[1].get("content", ""))
    raise ValueError("chat must be [user Q] (step 1) or [user Q, assistant rationale, user trigger] (step 2)")


def _rng(*parts: Any) -> random.Random:
    h = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


# --------------------------------------------------------------------------- answer sources


class ReplayIndex:
    """Recorded completions, looked up by reasoning prompt (step 1) and (prompt, rationale) (step 2)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.step1: dict[str, list[tuple[str, str]]] = {}
        self.step2: dict[tuple[str, str], str] = {}
        records = list(self._records())
        for idx, rp, rationale, finish, answer in sorted(records, key=lambda r: r[0]):
            self.step1.setdefault(rp, []).append((rationale, finish))
            self.step2.setdefault((rp, rationale.strip()), answer)
        if not self.step1:
            raise ValueError(f"{self.path}: no recorded completions to replay")

    def _records(self) -> Iterator[tuple]:
        if self.path.suffix == ".jsonl":
            from ..io import iter_jsonl

            for r in iter_jsonl(self.path):
                if r.get("error") is None and r.get("rationale") is not None:
                    yield ((r["sample_index"], r["sample_idx"]), r["reasoning_prompt"], r["rationale"],
                           r.get("finish_reason") or "stop", r.get("answer_completion") or "")
            return
        from ..io import read_json

        data = read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            raise ValueError(f"{self.path}: expected the authors' format {{'metadata': ..., 'data': {{index: [...]}}}}")
        for items in data["data"].values():
            for c in items:
                yield ((c["sample_index"], c.get("completion_index", 0)), c["reasoning_prompt"],
                       c["reasoning_completion"], c.get("reasoning_finish_reason") or "stop", c["completion"])

    def answer(self, step: int, question: str, rationale: Optional[str], sample: int) -> tuple[str, str]:
        rp = f"Q: {question}{STEP1_MARK}"
        if step == 1:
            recs = self.step1.get(rp)
            if not recs:
                raise LookupError("replay: no recorded completion for this reasoning prompt")
            return recs[sample % len(recs)]
        ans = self.step2.get((rp, (rationale or "").strip()))
        if ans is None:
            raise LookupError("replay: no recorded answer for this (prompt, rationale)")
        return ans, "stop"


def _synthetic_tasks() -> list:
    from ..tasks import synthetic_tasks

    return synthetic_tasks()


class Simulator:
    """Rule-based teacher for synthetic tasks: each registered task with `teacher_sim` is tried."""

    def __init__(self, error_rate: float, seed: int):
        self.error_rate, self.seed = error_rate, seed

    def answer(self, step: int, question: str, rationale: Optional[str], sample: int, temperature: float) -> tuple[str, str]:
        tasks = _synthetic_tasks()
        for task in tasks:
            if step == 1:
                rng = _rng(self.seed, question, sample if temperature > 0 else 0, temperature)
                try:
                    text, _ = task.teacher_sim(question, rng, self.error_rate)
                except ValueError:
                    continue
                return " " + text.strip(), "stop"
            try:
                text = task.teacher_answer(question, rationale or "")
            except ValueError:
                continue
            return (text if text[:1].isspace() else " " + text), "stop"
        names = ", ".join(t.name for t in tasks) or "none registered"
        raise LookupError(
            f"simulated teacher only answers synthetic task questions ({names}); this one is not; use replay mode"
        )


# --------------------------------------------------------------------------- the ASGI app


class SimStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter = Counter()  # by endpoint
        self.faults: Counter = Counter()
        self.answers: Counter = Counter()  # (prompt digest, sample) -> delivered answers
        self.previews: dict[str, str] = {}
        self.abandoned = 0  # answers not delivered: the client had gone (killed or timed out)
        self.in_flight = 0
        self.last_answer_at = 0.0
        self.started = time.time()

    def to_json(self, full: bool) -> dict:
        dup = {k: c for k, c in self.answers.items() if c > 1}
        out = {
            "total_requests": sum(self.requests.values()),
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "answered": sum(self.answers.values()),
            "answered_keys": len(self.answers),
            "max_answers_per_prompt_sample": max(self.answers.values(), default=0),
            "duplicates": [{"key": k, "count": c, "prompt": self.previews.get(k.rsplit("#", 1)[0], "")} for k, c in dup.items()],
            "abandoned": self.abandoned,
            "in_flight": self.in_flight,
            "seconds_since_last_answer": (time.time() - self.last_answer_at) if self.last_answer_at else None,
        }
        if full:
            out["answers"] = dict(self.answers)
        return out


def _error(status: int, message: str, etype: str, code: Optional[str] = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": etype, "param": None, "code": code}}


class SimApp:
    """Bare ASGI app: /v1/models, /v1/completions, /v1/chat/completions, /stats, /stats/reset."""

    def __init__(self, settings: SimSettings):
        self.s = settings
        self.stats = SimStats()
        self.fault_rng = random.Random(settings.seed + 1)
        if settings.mode == "replay" and not settings.replay_path:
            raise ValueError("teacher-sim replay mode needs a replay path (teacher.sim.replay_path / --replay)")
        self.replay = ReplayIndex(settings.replay_path) if settings.mode == "replay" else None
        self.sim = Simulator(settings.error_rate, settings.seed)
        self.key = os.environ.get(settings.require_key_env, "") if settings.require_key_env else None
        if settings.require_key_env and not self.key:
            raise ValueError(f"--require-key-env {settings.require_key_env}: that environment variable is not set")
        self.ids = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/stats":
            full = b"full=1" in scope.get("query_string", b"")
            return await _send_json(send, 200, self.stats.to_json(full))
        if path == "/stats/reset" and method == "POST":
            self.stats.reset()
            return await _send_json(send, 200, {"reset": True})
        self.stats.requests[path] += 1  # the observer's own calls (/stats) are not counted
        if self.key is not None and not self._authorized(scope):
            return await _send_json(send, *_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        if path == "/v1/models":
            return await _send_json(send, 200, {"object": "list", "data": [{
                "id": self.s.model, "object": "model", "created": 0, "owned_by": "ftcot-ray",
                "description": MODEL_DESCRIPTION, "mode": self.s.mode}]})
        if path not in ("/v1/completions", "/v1/chat/completions") or method != "POST":
            return await _send_json(send, *_error(404, f"no route {method} {path}", "invalid_request_error"))
        self.stats.in_flight += 1
        try:
            await self._generate(path, body, receive, send)
        finally:
            self.stats.in_flight -= 1

    def _authorized(self, scope) -> bool:
        for k, v in scope["headers"]:
            if k == b"authorization":
                return v.decode() == f"Bearer {self.key}"
        return False

    async def _generate(self, path: str, body: bytes, receive, send) -> None:
        try:
            req = json.loads(body)
            chat = path.endswith("chat/completions")
            prompt = req["messages"] if chat else req["prompt"]
            if isinstance(prompt, list) and not chat:
                if len(prompt) != 1:
                    raise ValueError("one prompt per request")
                prompt = prompt[0]
            step, question, rationale = parse_chat(prompt) if chat else parse_step(prompt)
        except (ValueError, KeyError, TypeError) as e:
            return await _send_json(send, *_error(400, f"bad request: {e}", "invalid_request_error"))
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
            n, temperature = int(req.get("n") or 1), float(req.get("temperature", 1.0) or 0.0)
            seed = req.get("seed")
            first = int(seed) if seed is not None else random.randrange(1 << 30)
            try:
                choices = [self._choice(step, question, rationale, first + i, temperature, req, chat, i) for i in range(n)]
            except LookupError as e:
                return await _send_json(send, *_error(400, str(e), "invalid_request_error"))
            digest = _prompt_digest(prompt)
            for i in range(n):
                self.stats.answers[f"{digest}#{first + i}"] += 1
            self.stats.previews.setdefault(digest, (prompt if isinstance(prompt, str) else json.dumps(prompt))[:120])
            self.stats.last_answer_at = time.time()
            await _send_json(send, 200, self._response(chat, req, prompt, choices))
        finally:
            if gone is not None:
                gone.cancel()

    def _choice(self, step, question, rationale, sample, temperature, req, chat, i) -> dict:
        if self.replay is not None:
            text, finish = self.replay.answer(step, question, rationale, sample)
        else:
            text, finish = self.sim.answer(step, question, rationale, sample, temperature)
        text, cut = truncate_tokens(text, int(req.get("max_tokens") or 1 << 30))
        finish = "length" if cut == "length" else finish
        if chat:
            return {"index": i, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}
        return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}

    def _response(self, chat: bool, req: dict, prompt, choices: list[dict]) -> dict:
        self.ids += 1
        ptoks = count_tokens(prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt))
        ctoks = sum(count_tokens(c["message"]["content"] if chat else c["text"]) for c in choices)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-sim{self.ids}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.get("model") or self.s.model,
            "choices": choices,
            "usage": {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks},
        }

    def _roll_fault(self) -> Optional[str]:
        u = self.fault_rng.random()
        for name, rate in (("429", self.s.rate_429), ("500", self.s.rate_500),
                           ("timeout", self.s.rate_timeout), ("malformed", self.s.rate_malformed)):
            if u < rate:
                return name
            u -= rate
        return None

    async def _send_fault(self, send, fault: str) -> None:
        if fault == "429":
            status, body = _error(429, "Rate limit reached (simulated).", "rate_limit_error", "rate_limit_exceeded")
            return await _send_json(send, status, body, [(b"retry-after", str(self.s.retry_after_s).encode())])
        if fault == "malformed":
            return await _send_raw(send, 200, b'{"id": "cmpl-broken", "choices": [{"text": "trunc')
        # "500", and a "timeout" whose client is still there after hanging
        return await _send_json(send, *_error(500, "The server had an error (simulated).", "server_error"))


def _prompt_digest(prompt) -> str:
    blob = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


async def _send_json(send, status: int, obj: dict, headers: list | None = None) -> None:
    await _send_raw(send, status, json.dumps(obj).encode(), headers)


async def _send_raw(send, status: int, body: bytes, headers: list | None = None) -> None:
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- running it


def _uvicorn_config(app: SimApp, host: str, port: int):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                          log_level="warning", access_log=False, backlog=4096, timeout_keep_alive=30)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_ready(base_url: str, timeout: float = 30.0, proc: Optional[subprocess.Popen] = None) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"teacher-sim exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url.rsplit("/v1", 1)[0] + "/stats", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"teacher-sim at {base_url} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def running_sim(settings: SimSettings, *, port: Optional[int] = None, host: str = "127.0.0.1",
                subprocess_mode: bool = False) -> Iterator[str]:
    """Start a teacher-sim on a free port, yield its base URL (``http://host:port/v1``), stop it on exit.

    In-process (a background thread) by default, which sees tasks registered by the caller; with
    ``subprocess_mode`` it runs ``ftcot teacher-sim`` in its own process (its own core: benchmarks).
    """
    port = port or _free_port(host)
    base_url = f"http://{host}:{port}/v1"
    if subprocess_mode:
        cmd = [sys.executable, "-m", "ftcot_ray.cli", "teacher-sim", "--host", host, "--port", str(port),
               "--settings-json", json.dumps(dataclasses.asdict(settings))]
        proc = subprocess.Popen(cmd, stdout=2)  # its banner goes with the framework logs (stderr)
        try:
            _wait_ready(base_url, proc=proc)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(SimApp(settings), host, port))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, name="teacher-sim", daemon=True)
    thread.start()
    try:
        _wait_ready(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--mode", choices=["simulated", "replay"], default=d.mode)
    parser.add_argument("--replay", dest="replay_path", help="authors' D_*.json or a completions.jsonl to replay")
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--error-rate", type=float, default=d.error_rate, help="simulated: wrong-reasoning rate")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--latency-ms", type=float, default=d.latency_ms)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--retry-after-s", type=float, default=d.retry_after_s)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--rate-timeout", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=d.hang_s)
    parser.add_argument("--rate-malformed", type=float, default=0.0)
    parser.add_argument("--require-key-env", default=None, help="check requests' bearer key against $NAME")
    parser.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.settings_json:
        settings = SimSettings(**json.loads(args.settings_json))
    else:
        fields = {f.name for f in dataclasses.fields(SimSettings)}
        settings = SimSettings(**{k: v for k, v in vars(args).items() if k in fields})
    app = SimApp(settings)
    print(f"teacher-sim ({settings.mode}) on http://{args.host}:{args.port}/v1 — {MODEL_DESCRIPTION}", flush=True)
    uvicorn.Server(_uvicorn_config(app, args.host, args.port)).run()
    return 0
