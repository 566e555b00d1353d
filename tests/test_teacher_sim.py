"""teacher-sim over real HTTP on 127.0.0.1, and the async client against it (no Ray here)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ftcot_ray.config import TeacherConfig, TeacherSimConfig
from ftcot_ray.prompts import answer_prompt, chat_messages, reasoning_prompt
from ftcot_ray.teacher.answers import AnswerStore
from ftcot_ray.teacher.client import Secret, TeacherClient, TeacherSetupError, preflight
from ftcot_ray.teacher.limiter import JobGate, Permits
from ftcot_ray.teacher.sim import MODEL_DESCRIPTION, running_sim

from helpers_teacher import register_add_task, sim_stats

AUTHORS = "reasoning-teacher/teacher_completions_mmmaxyoung_test2/saved/completion_data/B_text-davinci-002__C_zs_cot"
Q = "What is 12 plus 30?"


@pytest.fixture(scope="module")
def sim():
    register_add_task()
    with running_sim(TeacherSimConfig(error_rate=0.5, seed=3)) as url:
        yield url


def oai(url: str, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=10)


def test_models_says_what_it_is(sim):
    m = oai(sim).models.list().data[0]
    assert m.id == "ftcot-sim-teacher" and "not a language model" in MODEL_DESCRIPTION
    assert m.model_extra["description"] == MODEL_DESCRIPTION


def test_simulated_samples_differ_by_seed_at_temperature_and_not_at_zero(sim):
    c = oai(sim)
    hot = c.completions.create(model="m", prompt=reasoning_prompt(Q), n=8, seed=0, temperature=0.7, max_tokens=128)
    assert len(hot.choices) == 8 and len({ch.text for ch in hot.choices}) > 1
    again = c.completions.create(model="m", prompt=reasoning_prompt(Q), n=8, seed=0, temperature=0.7, max_tokens=128)
    assert [ch.text for ch in again.choices] == [ch.text for ch in hot.choices]  # seeded: reproducible
    one = c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=3, temperature=0.7, max_tokens=128)
    assert one.choices[0].text == hot.choices[3].text  # choice i of seed s is sample s + i
    cold = c.completions.create(model="m", prompt=reasoning_prompt(Q), n=4, seed=0, temperature=0, max_tokens=128)
    assert len({ch.text for ch in cold.choices}) == 1
    assert hot.usage.prompt_tokens > 0 and hot.usage.completion_tokens > 8


def test_step2_reads_its_own_rationale_and_max_tokens_cuts(sim):
    c = oai(sim)
    r1 = c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=1, temperature=0.7, max_tokens=128)
    rationale = r1.choices[0].text
    r2 = c.completions.create(model="m", prompt=answer_prompt(Q, rationale), seed=1, max_tokens=32)
    assert r2.choices[0].text.strip(" .") == rationale.rstrip(".").split()[-1]
    short = c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=1, temperature=0.7, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and len(short.choices[0].text.split()) == 3


def test_chat_is_a_two_turn_conversation(sim):
    c = oai(sim)
    r1 = c.chat.completions.create(model="m", messages=chat_messages(Q), seed=0, temperature=0.7, max_tokens=128)
    rationale = r1.choices[0].message.content
    assert rationale and not rationale.startswith(" ")
    r2 = c.chat.completions.create(model="m", messages=chat_messages(Q, rationale), seed=0, max_tokens=32)
    assert r2.choices[0].message.content.strip(" .") == rationale.rstrip(".").split()[-1]


def test_non_task_questions_get_a_clear_400(sim):
    with pytest.raises(openai.BadRequestError, match="synthetic task"):
        oai(sim).completions.create(model="m", prompt=reasoning_prompt("Who wrote Hamlet?"), max_tokens=5)


def test_stats_count_answers_per_prompt_and_sample():
    register_add_task()
    with running_sim(TeacherSimConfig()) as url:
        c = oai(url)
        c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=5, max_tokens=9)
        c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=6, max_tokens=9)
        assert sim_stats(url)["max_answers_per_prompt_sample"] == 1
        c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=5, max_tokens=9)
        s = sim_stats(url)
        assert s["requests"]["/v1/completions"] == 3 and s["answered_keys"] == 2
        assert s["max_answers_per_prompt_sample"] == 2 and s["duplicates"][0]["prompt"].startswith("Q: What is 12")


def test_faults_are_real_http_faults():
    register_add_task()
    with running_sim(TeacherSimConfig(rate_429=1.0, retry_after_s=7)) as url:
        r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)})
        assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["type"] == "rate_limit_error"
    with running_sim(TeacherSimConfig(rate_500=1.0)) as url:
        assert httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)}).status_code == 500
    with running_sim(TeacherSimConfig(rate_malformed=1.0)) as url:
        r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)})
        with pytest.raises(json.JSONDecodeError):
            r.json()
    with running_sim(TeacherSimConfig(rate_timeout=1.0, hang_s=3)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)}, timeout=0.3)


@pytest.mark.shared
def test_replay_answers_from_the_authors_file(shared_datasets):
    path = shared_datasets / AUTHORS / "D_coin_flip.json"
    rec = json.loads(path.read_text())["data"]["0"][0]
    with running_sim(TeacherSimConfig(mode="replay", replay_path=str(path))) as url:
        c = oai(url)
        r1 = c.completions.create(model="m", prompt=rec["reasoning_prompt"], seed=0, max_tokens=128)
        assert r1.choices[0].text == rec["reasoning_completion"]
        r2 = c.completions.create(model="m", prompt=answer_prompt(rec["question"], r1.choices[0].text), seed=0, max_tokens=32)
        assert r2.choices[0].text == rec["completion"]
        assert answer_prompt(rec["question"], rec["reasoning_completion"]) == rec["prompt"]  # byte-identical wording


def test_wrong_key_is_401_and_preflight_says_which_variable(monkeypatch):
    monkeypatch.setenv("FTCOT_SIM_KEY", "sk-right-key-42")
    with running_sim(TeacherSimConfig(require_key_env="FTCOT_SIM_KEY")) as url:
        with pytest.raises(openai.AuthenticationError):
            oai(url, "sk-wrong").models.list()
        assert oai(url, "sk-right-key-42").models.list().data
        with pytest.raises(TeacherSetupError, match=r"\$MY_KEY_VAR") as e:
            preflight(url, Secret("sk-wrong-key-99"), "MY_KEY_VAR")
        assert "sk-wrong" not in str(e.value)


def test_preflight_names_an_unreachable_endpoint(port):
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TeacherSetupError, match=f"cannot reach the teacher at {url}"):
        preflight(url, Secret("x"), "K", timeout_s=2)


# --------------------------------------------------------------------------- the client, no Ray


def _client(url: str, tmp_path, **kw) -> TeacherClient:
    """A client whose answers go to `tmp_path/cache` (its log), looking up what that store held when made."""
    t = TeacherConfig(concurrency=8, max_attempts=kw.pop("max_attempts", 6), backoff_base_s=0.01, backoff_max_s=0.05,
                      timeout_s=kw.pop("timeout_s", 5), temperature=0.7, **kw)
    gated = bool(t.rpm or t.tpm or t.budget_usd is not None)
    permits = Permits(JobGate(rpm=t.rpm, tpm=t.tpm, budget_usd=t.budget_usd), gated, 0.001 if gated else 0, local=True)
    store = AnswerStore(tmp_path / "cache")
    return TeacherClient(t, base_url=url, endpoint_id="sim-test", secret=Secret("x"), permits=permits,
                         index=store.build_index(), log=store.log())


def _run(client: TeacherClient, *steps):
    """Run client.step calls on one event loop, then store what they got (the log closes into a block)."""
    async def go():
        try:
            return await asyncio.gather(*(client.step(*a, **kw) for a, kw in steps))
        finally:
            await client.close()
            client.log.close()

    return asyncio.run(go())


def test_client_retries_faults_then_caches(tmp_path):
    register_add_task()
    with running_sim(TeacherSimConfig(rate_429=0.2, retry_after_s=0.05, rate_500=0.2, rate_malformed=0.2, seed=1)) as url:
        client = _client(url, tmp_path)
        results = _run(client, *(((f"What is {i} plus 1?", None, [0, 1]), {}) for i in range(10)))
        flat = [r for d in results for r in d.values()]
        assert len(flat) == 20 and all(r.error is None and r.text for r in flat)
        assert client.delta["retries"] > 0 and sum(r.attempts for r in flat) > 20
        s = sim_stats(url)
        assert s["faults"] and s["answered"] == 20 and s["max_answers_per_prompt_sample"] == 1
        assert AnswerStore(tmp_path / "cache").block_names()  # 20 answers: one block (fewer than a block's rows)
        again = _client(url, tmp_path)
        (res,) = _run(again, (("What is 0 plus 1?", None, [0, 1]), {}))
        assert all(r.cached for r in res.values()) and sim_stats(url)["answered"] == 20  # nothing sent


def test_client_gives_up_after_max_attempts_with_the_error(tmp_path):
    register_add_task()
    with running_sim(TeacherSimConfig(rate_500=1.0)) as url:
        client = _client(url, tmp_path, max_attempts=3)
        (res,) = _run(client, ((Q, None, [0]), {}))
        assert res[0].error.startswith("gave up after 3 attempts: HTTP 500") and res[0].attempts == 3
        assert sim_stats(url)["requests"]["/v1/completions"] == 3
        assert len(AnswerStore(tmp_path / "cache").build_index()) == 0  # errors are never stored


def test_client_times_out_hung_requests_and_retries(tmp_path):
    register_add_task()
    with running_sim(TeacherSimConfig(rate_timeout=0.5, hang_s=5, seed=2)) as url:
        client = _client(url, tmp_path, timeout_s=0.5)
        (res,) = _run(client, ((Q, None, [0, 1, 2, 3]), {}))
        assert all(r.error is None for r in res.values())
        assert client.delta["failed_requests"] >= 1


def test_client_uses_n_for_contiguous_samples(tmp_path):
    register_add_task()
    with running_sim(TeacherSimConfig()) as url:
        client = _client(url, tmp_path, use_n=True)
        (res,) = _run(client, ((Q, None, [0, 1, 2, 3]), {}))
        assert len(res) == 4 and sim_stats(url)["requests"]["/v1/completions"] == 1
        separate = _client(url, tmp_path / "other")
        (res2,) = _run(separate, ((Q, None, [0, 1, 2, 3]), {}))
        assert [res[i].text for i in range(4)] == [res2[i].text for i in range(4)]  # same samples either way


# --------------------------------------------------------------------------- health, streaming, the command line


def test_health_route_and_streamed_answers_equal_the_plain_ones(sim):
    root = sim.rsplit("/v1", 1)[0]
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
    c = oai(sim)
    plain = c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=2, temperature=0.7, max_tokens=128)
    chunks = list(c.completions.create(model="m", prompt=reasoning_prompt(Q), seed=2, temperature=0.7, max_tokens=128,
                                       stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    chat = list(c.chat.completions.create(model="m", messages=chat_messages(Q), seed=2, temperature=0.7,
                                          max_tokens=128, stream=True))
    whole = c.chat.completions.create(model="m", messages=chat_messages(Q), seed=2, temperature=0.7, max_tokens=128)
    assert "".join(ch.choices[0].delta.content or "" for ch in chat) == whole.choices[0].message.content
    assert chat[-1].choices[0].finish_reason == "stop"


def test_sim_flags_are_generated_from_the_one_settings_model(capsys):
    import argparse

    from ftcot_ray import cli
    from ftcot_ray.teacher.sim.server import add_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest for a in p._actions}
    assert set(TeacherSimConfig.model_fields) <= flags  # a new settings field is a new flag, nothing else to edit
    args = p.parse_args(["--mode", "replay", "--replay", "x.jsonl", "--rate-429", "0.25", "--batch-delay-s", "3"])
    s = settings_from_args(args)
    assert (s.mode, s.replay_path, s.rate_429, s.batch_delay_s, s.error_rate) == ("replay", "x.jsonl", 0.25, 3.0, 0.15)
    assert cli.main(["teacher-sim", "--rate-500", "1.5"]) == 2  # the model's bounds hold on the command line too
    assert "--rate-500" in capsys.readouterr().err


# --------------------------------------------------------------------------- the Batch API, with the stock SDK


def _batch_file(c: openai.OpenAI, lines: list[dict]):
    import io

    blob = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return c.files.create(file=("in.jsonl", io.BytesIO(blob)), purpose="batch")


def _line(i: int, question: str = Q) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": reasoning_prompt(question), "seed": i, "temperature": 0.7, "max_tokens": 128}}


def _wait(c: openai.OpenAI, batch_id: str, timeout: float = 10):
    import time

    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = c.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b, seen
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {seen[-1]}")


def test_batch_lifecycle_output_equals_sync_answers_and_lines_fail_on_purpose():
    register_add_task()
    with running_sim(TeacherSimConfig(error_rate=0.5, seed=3, batch_delay_s=0.6, batch_line_error_rate=0.4)) as url:
        c = oai(url)
        f = _batch_file(c, [_line(i) for i in range(24)])  # 24 lines at 0.4: P(no failure) = 5e-6
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert b.status == "validating" and b.request_counts.total == 24
        done, seen = _wait(c, b.id)
        assert seen[0] == "validating" and "in_progress" in seen and seen[-1] == "completed"
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in c.files.content(done.error_file_id).text.splitlines()]
        assert len(out) + len(err) == 24 and 0 < len(err) < 24 and done.request_counts.failed == len(err)
        assert all(e["response"]["status_code"] == 500 and e["custom_id"].startswith("req-") for e in err)
        for o in out:  # a batch answer is the synchronous answer to the same request
            i = int(o["custom_id"].split("-")[1])
            sync = c.completions.create(**_line(i)["body"])
            assert o["response"]["body"]["choices"][0]["text"] == sync.choices[0].text
        s = sim_stats(url)
        assert s["batches_created"] == 1 and s["batch_lines_submitted"] == 24 and s["max_submissions_per_batch_line"] == 1
        assert [x.id for x in c.batches.list().data] == [b.id]


def test_batch_expiry_cancellation_and_bad_input():
    register_add_task()
    with running_sim(TeacherSimConfig(batch_delay_s=2.0, batch_expire_s=0.8)) as url:
        c = oai(url)
        expired, _ = _wait(c, c.batches.create(input_file_id=_batch_file(c, [_line(i) for i in range(10)]).id,
                                              endpoint="/v1/completions", completion_window="24h").id)
        assert expired.status == "expired"
        err = [json.loads(x) for x in c.files.content(expired.error_file_id).text.splitlines()]
        out = c.files.content(expired.output_file_id).text.splitlines() if expired.output_file_id else []
        assert len(out) + len(err) == 10 and err and all(e["error"]["code"] == "batch_expired" for e in err)
    with running_sim(TeacherSimConfig(batch_delay_s=5.0)) as url:
        c = oai(url)
        b = c.batches.create(input_file_id=_batch_file(c, [_line(i) for i in range(5)]).id,
                             endpoint="/v1/completions", completion_window="24h")
        assert c.batches.cancel(b.id).status == "cancelling"
        cancelled, _ = _wait(c, b.id)
        assert cancelled.status == "cancelled" and cancelled.request_counts.failed == 5
        dup = _batch_file(c, [_line(1), _line(1)])
        bad = c.batches.create(input_file_id=dup.id, endpoint="/v1/completions", completion_window="24h")
        assert bad.status == "failed" and bad.errors.data[0].code == "duplicate_custom_id"
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
