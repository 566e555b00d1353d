"""`ftcot serve` for real: Ray Serve on 127.0.0.1, tiny GPT-2 and T5 students exported as training
exports them, the stock openai SDK and raw HTTP. One Serve instance for the module (deployed by the
stage itself, `stages.serve.run(cfg, detach=True)`), shut down at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ftcot_ray.config import load_config
from ftcot_ray.evaluation import majority_vote, read_prediction
from ftcot_ray.serve.reasoning import split_output
from ftcot_ray.student.card import read_card
from ftcot_ray.student.export import export_untrained

from conftest import free_port
from helpers_eval import coin_questions, corpus

KEY_ENV, KEY = "FTCOT_TEST_SERVE_KEY", "test-key-7f3a9c"
TEXTS = corpus() + [" The coin starts heads up. Ann flips it, so it is tails up. --> no",
                    " Bob holds it, and it is heads up. --> yes"] * 40
QUESTIONS = [q["question"] for q in coin_questions(12, seed=5)]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    folders: dict
    cfg: object
    summary: dict

    def client(self, key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)


def students(root: Path) -> dict:
    # An ft_cot GPT-2 (reasoning, then the answer after `-->`) and a vanilla T5 (the answer only), on a
    # letters task so that random weights still yield answers the rules can read.
    return {"g": export_untrained(root / "g", TEXTS, arch="gpt2", weight_scale=4.0, eos_boost=2.0,
                                  dataset="last_letters_synth"),
            "t": export_untrained(root / "t", TEXTS, arch="t5", weight_scale=4.0, eos_boost=2.0,
                                  dataset="last_letters_synth", method="vanilla")}


def serve_overrides(folders: dict, port: int, run_dir: Path, *extra: str) -> list[str]:
    ids = ", ".join(f"{k}: {v}" for k, v in folders.items())
    return [f"run_dir={run_dir}", f"serve.port={port}", f"serve.students={{{ids}}}", "serve.cpus_per_replica=0.5",
            "serve.ingress_cpus=0", "serve.torch_threads=1", "serve.max_tokens=24", "serve.batch_wait_timeout_s=0.05",
            *extra]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from ftcot_ray.stages import serve as serve_stage

    root = tmp_path_factory.mktemp("serve")
    folders = students(root)
    port = free_port()
    cfg = load_config("quickstart", serve_overrides(folders, port, root / "run", f"serve.api_key_env={KEY_ENV}"))
    os.environ[KEY_ENV] = KEY
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address  # "a cluster": --detach allowed
    try:
        summary = serve_stage.run(cfg, detach=True)
    finally:
        os.environ.pop("RAY_ADDRESS") if saved is None else os.environ.__setitem__("RAY_ADDRESS", saved)
    yield Server(f"http://127.0.0.1:{port}", port, folders, cfg, summary)
    serve.shutdown()
    os.environ.pop(KEY_ENV, None)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def chat_body(model: str, question: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], **kw}


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


# --------------------------------------------------------------------------- the stage's own report


def test_stage_summary_and_model_listing(server):
    assert server.summary["base_url"] == f"{server.url}/v1"
    assert set(server.summary["models"]) == {"g", "t"} and server.summary["auth"] is True
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"g", "t"}
    assert extra(models["g"], "ftcot")["method"] == "ft_cot" and extra(models["t"], "ftcot")["family"] == "encoder-decoder"
    assert server.client().models.retrieve("t").id == "t"


# --------------------------------------------------------------------------- SDK, streamed == whole


@pytest.mark.parametrize("model", ["g", "t"])
def test_sdk_chat_streamed_equals_whole(server, model):
    client = server.client()
    for q in QUESTIONS[:3]:
        whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0)
        msg = whole.choices[0].message
        reasoning, content, finish, usage = "", None, None, None
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                reasoning += extra(c.delta, "reasoning") or ""
                assert extra(c.delta, "reasoning") == extra(c.delta, "reasoning_content")
                if c.delta.content:
                    content = (content or "") + c.delta.content
                finish = c.finish_reason or finish
        assert reasoning == (extra(msg, "reasoning") or "")
        assert extra(msg, "reasoning") == extra(msg, "reasoning_content")
        assert content == msg.content and finish == whole.choices[0].finish_reason in ("stop", "length")
        assert usage.model_dump() == whole.usage.model_dump()
        assert whole.usage.prompt_tokens > 10 and 1 <= whole.usage.completion_tokens <= 24


@pytest.mark.parametrize("model", ["g", "t"])
def test_sdk_completions_streamed_equals_whole(server, model):
    client = server.client()
    for q in QUESTIONS[:3]:
        whole = client.completions.create(model=model, prompt=q, max_tokens=20)
        text, answer, finish = "", "unset", None
        for chunk in client.completions.create(model=model, prompt=q, max_tokens=20, stream=True):
            for c in chunk.choices:
                text += c.text
                if c.finish_reason:
                    finish, answer = c.finish_reason, extra(c, "answer")
        assert text == whole.choices[0].text and finish == whole.choices[0].finish_reason
        assert answer == extra(whole.choices[0], "answer")
        assert whole.usage.completion_tokens <= 20


def test_content_is_the_tasks_extraction(server):
    client, found = server.client(), {"g": 0, "t": 0}
    for model in ("g", "t"):
        card = read_card(server.folders[model])
        for q in QUESTIONS:
            raw = client.completions.create(model=model, prompt=q).choices[0]
            msg = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}]).choices[0].message
            want = read_prediction(card.rules, raw.text, card.method)[0]
            assert msg.content == want == extra(raw, "answer")
            assert (extra(msg, "reasoning"), msg.content) == split_output(card, raw.text)
            found[model] += want is not None
    assert found["g"] > 0 and found["t"] > 0, found  # not only "no answer" == "no answer"


# --------------------------------------------------------------------------- raw SSE


def test_raw_sse_framing(server):
    body = chat_body("g", QUESTIONS[0], stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e, repr(e)  # one JSON object on one data: line
        chunks.append(json.loads(e[len("data: "):]))
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    *body_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["total_tokens"] == \
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in body_chunks)
    assert [c["choices"][0]["finish_reason"] for c in body_chunks].count(None) == len(body_chunks) - 1


# --------------------------------------------------------------------------- batching


def test_batched_equals_unbatched_over_http(server):
    from ray import serve

    from ftcot_ray.serve.app import deployment_name

    def ask(q):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "g", "prompt": q, "max_tokens": 24},
                       headers=auth(), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    handle = serve.get_deployment_handle(deployment_name("g"), app_name=server.cfg.serve.app_name)
    alone = [ask(q) for q in QUESTIONS]  # one at a time: batches of one
    before = handle.stats.remote().result()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    after = handle.stats.remote().result()
    assert together == alone
    assert after["max_batch_rows"] > 1, after  # they really shared forward passes
    assert after["batches"] - before["batches"] < len(QUESTIONS)


def test_n_choices_and_vote(server):
    client = server.client()
    kw = dict(model="g", messages=[{"role": "user", "content": QUESTIONS[1]}], n=4, temperature=1.2, seed=7,
              max_tokens=16, extra_body={"vote": True})
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    answers = [c.message.content for c in r.choices]
    vote = extra(r, "vote")
    card = read_card(server.folders["g"])
    assert vote["answers"] == answers and vote["answer"] == majority_vote(answers, card.rules) and vote["n"] == 4
    assert len({c.message.model_extra["reasoning"] for c in r.choices}) > 1  # sampled, not four copies
    again = client.chat.completions.create(**kw)
    assert [c.message.model_extra["reasoning"] for c in again.choices] == \
        [c.message.model_extra["reasoning"] for c in r.choices]  # seeded
    streamed_vote = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        streamed_vote = extra(chunk, "vote") or streamed_vote
    assert streamed_vote == vote


# --------------------------------------------------------------------------- auth and errors


def test_auth_rejects_missing_and_wrong_keys(server):
    from openai import AuthenticationError

    url = f"{server.url}/v1/chat/completions"
    body = chat_body("g", QUESTIONS[0])
    for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer nope"}, "invalid_api_key"),
                          ({"Authorization": f"Basic {KEY}"}, "invalid_api_key"),
                          ({"Authorization": f"Bearer {KEY}x"}, "invalid_api_key")]:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == code
        assert KEY not in r.text
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    with pytest.raises(AuthenticationError):
        server.client("wrong").chat.completions.create(model="g", messages=[{"role": "user", "content": "q"}])
    assert httpx.post(url, json=body, headers=auth(), timeout=30).status_code == 200


def _long_question() -> str:
    return " ".join(["Ann flips the coin."] * 200)


MALFORMED = [
    # (path, raw body or JSON, status, param, words the message must hold)
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b'{"model": "g", "messages": "\xff"}', 400, None, "UTF-8"),
    ("/v1/chat/completions", b"[]", 400, None, "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}, 400, "model", "model"),
    ("/v1/chat/completions", {"model": "g"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": "g", "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": "g", "messages": [{"role": "user", "content": ""}]}, 400,
     "messages[0].content", "empty"),
    ("/v1/chat/completions", {"model": "g", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content", "messages[0].content"),
    ("/v1/chat/completions", {"model": "g", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}, 400, "messages",
     "one question"),
    ("/v1/chat/completions", chat_body("nope", "q"), 404, "model", "served models: g, t"),
    ("/v1/chat/completions", chat_body("g", "q", max_tokens=0), 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", chat_body("g", "q", max_tokens="5"), 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", chat_body("g", "q", max_tokens=100000), 400, "max_tokens", "at most"),
    ("/v1/chat/completions", chat_body("g", _long_question()), 400, "messages[0].content", "positions"),
    ("/v1/chat/completions", chat_body("t", _long_question()), 400, "messages[0].content", "train.max_length"),
    ("/v1/chat/completions", chat_body("g", "q", n=0), 400, "n", "n"),
    ("/v1/chat/completions", chat_body("g", "q", n=100, temperature=1), 400, "n", "at most 16"),
    ("/v1/chat/completions", chat_body("g", "q", n=3), 400, "n", "temperature > 0"),
    ("/v1/chat/completions", chat_body("g", "q", temperature=-1), 400, "temperature", "temperature"),
    ("/v1/chat/completions", chat_body("g", "q", temperature=9), 400, "temperature", "temperature"),
    ("/v1/chat/completions", chat_body("g", "q", top_p=1.5), 400, "top_p", "top_p"),
    ("/v1/chat/completions", chat_body("g", "q", stream="yes"), 400, "stream", "stream"),
    ("/v1/chat/completions", chat_body("g", "q", stream_options={"include_usage": True}), 400, "stream_options",
     "stream: true"),
    ("/v1/chat/completions", chat_body("g", "q", frobnicate=True), 400, "frobnicate", "unknown parameter"),
    ("/v1/chat/completions", chat_body("g", "q", stop=["."]), 400, "stop", "not supported"),
    ("/v1/chat/completions", chat_body("g", "q", tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools", "not supported"),
    ("/v1/chat/completions", chat_body("g", "q", logprobs=True), 400, "logprobs", "not supported"),
    ("/v1/chat/completions", chat_body("g", "q", vote="yes"), 400, "vote", "vote"),
    ("/v1/completions", {"model": "g"}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "g", "prompt": [1, 2, 3]}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "g", "prompt": "  "}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "g", "prompt": "q", "echo": True}, 400, "echo", "not supported"),
    ("/v1/nothing-here", {}, 404, None, "no route"),
]


def test_malformed_requests_then_a_good_one(server):
    assert len(MALFORMED) >= 20
    for path, body, status, param, words in MALFORMED:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{server.url}{path}", headers={**auth(), "Content-Type": "application/json"}, timeout=30, **kw)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "...", r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param, (body, err)
        assert words in err["message"], (words, err["message"])
    r = httpx.get(f"{server.url}/v1/chat/completions", headers=auth(), timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    good = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("g", QUESTIONS[0]), headers=auth(), timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_overload_answers_503_with_retry_after(server):
    from ray import serve

    from ftcot_ray.serve.app import build_application
    from ftcot_ray.serve.students import resolve

    cfg = load_config("quickstart", serve_overrides({"g": server.folders["g"]}, server.port, Path(server.cfg.run_dir),
                                                    "serve.app_name=busy", "serve.route_prefix=/busy",
                                                    "serve.max_batch_size=1", "serve.max_ongoing_requests=1",
                                                    "serve.max_queued_requests=1", "serve.cpus_per_replica=0.25",
                                                    "serve.retry_after_s=2"))
    serve.run(build_application(cfg, resolve(cfg)[0]), name="busy", route_prefix="/busy")
    try:
        url = f"{server.url}/busy/v1/completions"

        def ask(_):
            r = httpx.post(url, json={"model": "g", "prompt": QUESTIONS[0], "max_tokens": 400}, timeout=120)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(8)))
        statuses = sorted(s for s, _, _ in results)
        assert 200 in statuses and 503 in statuses, statuses
        for status, retry, body in results:
            if status == 503:
                assert retry == "2" and body["error"]["code"] == "overloaded" and "retry" in body["error"]["message"]
        assert ask(0)[0] == 200  # and it keeps serving
    finally:
        serve.delete("busy")


# --------------------------------------------------------------------------- slow: autoscaling, the CLI


def _running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscaling_up_under_a_burst_and_down_when_idle(server):
    from ray import serve

    from ftcot_ray.serve.app import build_application, deployment_name
    from ftcot_ray.serve.students import resolve

    cfg = load_config("quickstart", serve_overrides(
        {"g": server.folders["g"]}, server.port, Path(server.cfg.run_dir), "serve.app_name=scale",
        "serve.route_prefix=/scale", "serve.min_replicas=1", "serve.max_replicas=2", "serve.target_ongoing_requests=2",
        "serve.upscale_delay_s=1", "serve.downscale_delay_s=3", "serve.look_back_period_s=2",
        "serve.metrics_interval_s=0.5", "serve.max_batch_size=4", "serve.max_ongoing_requests=8"))
    name = deployment_name("g")
    serve.run(build_application(cfg, resolve(cfg)[0]), name="scale", route_prefix="/scale")
    url = f"{server.url}/scale/v1/completions"
    failures, done, clients = [], 0, {"n": 12}
    stop = threading.Event()
    lock = threading.Lock()

    def client(k):
        nonlocal done
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                if k >= clients["n"]:
                    time.sleep(0.05)
                    continue
                try:
                    r = c.post(url, json={"model": "g", "prompt": QUESTIONS[k % len(QUESTIONS)], "max_tokens": 48})
                    failure = None if r.status_code == 200 else (r.status_code, r.text[:200])
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    failure = (type(e).__name__, str(e)[:200])
                with lock:
                    done += 1
                    if failure:
                        failures.append(failure)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(12)]
    try:
        assert _running("scale", name) == 1
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while _running("scale", name) < 2:  # the burst: 12 clients against a target of 2 per replica
            assert time.time() < deadline, "did not scale up to 2 replicas"
            time.sleep(0.5)
        served_at_peak = done
        clients["n"] = 1  # then nearly idle: one client, below the target
        deadline = time.time() + 120
        while _running("scale", name) > 1:
            assert time.time() < deadline, "did not scale back down to 1 replica"
            time.sleep(0.5)
        time.sleep(2)  # requests keep flowing across the downscale
        assert done > served_at_peak
    finally:
        stop.set()
        for t in threads:
            t.join(150)
        serve.delete("scale")
    assert failures == [], failures[:3]
    assert done > 20


@pytest.mark.slow
def test_cli_serves_until_ctrl_c(tmp_path):
    folders = students(tmp_path)
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ftcot_ray", "serve", "--config", "quickstart",
           *serve_overrides(folders, port, tmp_path / "run"), "resources.num_cpus=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.time() + 180
        while not any("Ctrl-C stops it" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.time() < deadline, "".join(lines)
            time.sleep(0.5)
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in text and " g " in text and " t " in text
        from openai import OpenAI

        r = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).chat.completions.create(
            model="t", messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)
    assert "Serve shut down" in "".join(lines)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] is True and set(summary["models"]) == {"g", "t"}
