"""teacher-sim over real HTTP on 127.0.0.1, and the async client against it (no Ray here)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ftcot_ray.config import TeacherConfig
from ftcot_ray.prompts import answer_prompt, chat_messages, reasoning_prompt
from ftcot_ray.teacher.cache import AnswerCache
from ftcot_ray.teacher.client import Secret, TeacherClient, TeacherSetupError, preflight
from ftcot_ray.teacher.limiter import JobGate, Permits
from ftcot_ray.teacher.sim import MODEL_DESCRIPTION, SimSettings, running_sim

from helpers_teacher import register_add_task, sim_stats

AUTHORS = "reasoning-teacher/teacher_completions_mmmaxyoung_test2/saved/completion_data/B_text-davinci-002__C_zs_cot"
Q = "What is 12 plus 30?"


@pytest.fixture(scope="module")
def sim():
    register_add_task()
    with running_sim(SimSettings(error_rate=0.5, seed=3)) as url:
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
    with running_sim(SimSettings()) as url:
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
    with running_sim(SimSettings(rate_429=1.0, retry_after_s=7)) as url:
        r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)})
        assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["type"] == "rate_limit_error"
    with running_sim(SimSettings(rate_500=1.0)) as url:
        assert httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)}).status_code == 500
    with running_sim(SimSettings(rate_malformed=1.0)) as url:
        r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)})
        with pytest.raises(json.JSONDecodeError):
            r.json()
    with running_sim(SimSettings(rate_timeout=1.0, hang_s=3)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json={"model": "m", "prompt": reasoning_prompt(Q)}, timeout=0.3)


@pytest.mark.shared
def test_replay_answers_from_the_authors_file(shared_datasets):
    path = shared_datasets / AUTHORS / "D_coin_flip.json"
    rec = json.loads(path.read_text())["data"]["0"][0]
    with running_sim(SimSettings(mode="replay", replay_path=str(path))) as url:
        c = oai(url)
        r1 = c.completions.create(model="m", prompt=rec["reasoning_prompt"], seed=0, max_tokens=128)
        assert r1.choices[0].text == rec["reasoning_completion"]
        r2 = c.completions.create(model="m", prompt=answer_prompt(rec["question"], r1.choices[0].text), seed=0, max_tokens=32)
        assert r2.choices[0].text == rec["completion"]
        assert answer_prompt(rec["question"], rec["reasoning_completion"]) == rec["prompt"]  # byte-identical wording


def test_wrong_key_is_401_and_preflight_says_which_variable(monkeypatch):
    monkeypatch.setenv("FTCOT_SIM_KEY", "sk-right-key-42")
    with running_sim(SimSettings(require_key_env="FTCOT_SIM_KEY")) as url:
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
    t = TeacherConfig(concurrency=8, max_attempts=kw.pop("max_attempts", 6), backoff_base_s=0.01, backoff_max_s=0.05,
                      timeout_s=kw.pop("timeout_s", 5), temperature=0.7, **kw)
    gated = bool(t.rpm or t.tpm or t.budget_usd is not None)
    permits = Permits(JobGate(rpm=t.rpm, tpm=t.tpm, budget_usd=t.budget_usd), gated, 200, 0.001 if gated else 0, local=True)
    return TeacherClient(t, base_url=url, endpoint_id="sim-test", secret=Secret("x"),
                         cache=AnswerCache(tmp_path / "cache"), permits=permits)


def test_client_retries_faults_then_caches(tmp_path):
    register_add_task()
    with running_sim(SimSettings(rate_429=0.2, retry_after_s=0.05, rate_500=0.2, rate_malformed=0.2, seed=1)) as url:
        client = _client(url, tmp_path)

        async def go():
            res = await asyncio.gather(*(client.step(reasoning_prompt(f"What is {i} plus 1?"), [0, 1], 128)
                                         for i in range(10)))
            await client.close()
            return res

        results = asyncio.run(go())
        flat = [r for d in results for r in d.values()]
        assert len(flat) == 20 and all(r.error is None and r.text for r in flat)
        assert client.delta["retries"] > 0 and sum(r.attempts for r in flat) > 20
        s = sim_stats(url)
        assert s["faults"] and s["answered"] == 20 and s["max_answers_per_prompt_sample"] == 1
        again = _client(url, tmp_path)
        res = asyncio.run(again.step(reasoning_prompt("What is 0 plus 1?"), [0, 1], 128))
        assert all(r.cached for r in res.values()) and sim_stats(url)["answered"] == 20  # nothing sent


def test_client_gives_up_after_max_attempts_with_the_error(tmp_path):
    register_add_task()
    with running_sim(SimSettings(rate_500=1.0)) as url:
        client = _client(url, tmp_path, max_attempts=3)
        res = asyncio.run(client.step(reasoning_prompt(Q), [0], 128))[0]
        assert res.error.startswith("gave up after 3 attempts: HTTP 500") and res.attempts == 3
        assert sim_stats(url)["requests"]["/v1/completions"] == 3
        assert AnswerCache(tmp_path / "cache").count() == 0  # errors are never cached


def test_client_times_out_hung_requests_and_retries(tmp_path):
    register_add_task()
    with running_sim(SimSettings(rate_timeout=0.5, hang_s=5, seed=2)) as url:
        client = _client(url, tmp_path, timeout_s=0.5)
        res = asyncio.run(client.step(reasoning_prompt(Q), [0, 1, 2, 3], 128))
        assert all(r.error is None for r in res.values())
        assert client.delta["failed_requests"] >= 1


def test_client_uses_n_for_contiguous_samples(tmp_path):
    register_add_task()
    with running_sim(SimSettings()) as url:
        client = _client(url, tmp_path, use_n=True)
        res = asyncio.run(client.step(reasoning_prompt(Q), [0, 1, 2, 3], 128))
        assert len(res) == 4 and sim_stats(url)["requests"]["/v1/completions"] == 1
        separate = _client(url, tmp_path / "other")
        res2 = asyncio.run(separate.step(reasoning_prompt(Q), [0, 1, 2, 3], 128))
        assert [res[i].text for i in range(4)] == [res2[i].text for i in range(4)]  # same samples either way
