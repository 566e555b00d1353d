"""Teacher logic without Ray or HTTP: cache keys, the job gate, prompt parsing, rows, the importer."""

from __future__ import annotations

import json
import time

import pytest

from ftcot_ray.artifacts import is_complete, read_manifest
from ftcot_ray.config import TeacherConfig, TeacherSimConfig
from ftcot_ray.io import read_jsonl
from ftcot_ray.prompts import answer_prompt, reasoning_prompt
from ftcot_ray.teacher.cache import AnswerCache, request_key
from ftcot_ray.teacher.client import Secret, StepResult, api_key_from_env, redact, TeacherSetupError
from ftcot_ray.schemas import COMPLETION_COLUMNS
from ftcot_ray.teacher.fanout import actor_plan, expand_rows, finish_row, request_ceilings
from ftcot_ray.teacher.importer import import_reasoning_teacher
from ftcot_ray.teacher.limiter import JobGate
from ftcot_ray.teacher.sim import sim_endpoint_id
from ftcot_ray.teacher.sim.sources import ReplayIndex, parse_chat, parse_step, truncate_tokens

AUTHORS = "reasoning-teacher/teacher_completions_mmmaxyoung_test2/saved/completion_data/B_text-davinci-002__C_zs_cot"


def test_cache_key_covers_what_changes_the_answer_and_nothing_else():
    base = dict(endpoint="https://api.x/v1", api="completions", model="m", prompt="Q: a\nA: Let's think step by step.",
                params={"temperature": 0.7, "top_p": 1.0, "max_tokens": 128}, sample_idx=0)
    k = request_key(**base)
    assert k == request_key(**base | {"params": {"max_tokens": 128, "top_p": 1.0, "temperature": 0.7}})  # order-free
    for change in ({"sample_idx": 1}, {"model": "m2"}, {"endpoint": "http://other/v1"}, {"api": "chat"},
                   {"prompt": "Q: b\nA: Let's think step by step."}, {"params": base["params"] | {"temperature": 1.0}}):
        assert request_key(**base | change) != k, change


def test_cache_roundtrip_is_atomic_and_sharded(tmp_path):
    cache = AnswerCache(tmp_path / "c")
    key = request_key("e", "completions", "m", "p", {}, 3)
    assert cache.get(key) is None
    cache.put(key, {"text": " hi", "finish_reason": "stop"})
    assert cache.get(key)["text"] == " hi"
    assert cache.path(key).relative_to(tmp_path / "c").parts == (key[:2], f"{key}.json")
    assert not list((tmp_path / "c").rglob("*.tmp")) and cache.count() == 1
    old = request_key("e", "completions", "m", "p", {}, 4)  # an answer in the two-level layout of older caches
    legacy = tmp_path / "c" / old[:2] / old[2:4] / f"{old}.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text('{"text": " old"}')
    assert cache.get(old)["text"] == " old" and cache.count() == 2


def test_gate_rpm_grants_a_burst_then_makes_callers_wait():
    gate = JobGate(rpm=120)  # 2/s: a bucket of 2
    first = gate.acquire(10, 1, 0)
    assert first["granted"] == 2
    nxt = gate.acquire(10, 1, 0)
    assert nxt["granted"] == 0 and 0 < nxt["wait_s"] <= 0.5


def test_gate_tpm_counts_tokens():
    gate = JobGate(tpm=6000)  # 100 tokens/s
    assert gate.acquire(10, 40, 0)["granted"] == 2
    assert gate.acquire(1, 40, 0)["granted"] == 0


def test_gate_budget_stops_before_it_would_be_exceeded():
    gate = JobGate(budget_usd=1.0, spent_usd=0.25)
    assert gate.acquire(10, 1, 0.3)["granted"] == 2  # 0.25 + 2 x 0.3 <= 1 < 0.25 + 3 x 0.3
    waiting = gate.acquire(1, 1, 0.3)
    assert waiting["granted"] == 0 and not waiting["budget_stop"]  # reservations in flight may free money
    gate.report({"cost_usd": 0.5, "released_usd": 0.6})  # the two calls cost 0.25 each
    assert gate.acquire(5, 1, 0.3)["granted"] == 0 and gate.budget_stopped  # 0.75 spent: 0.3 no longer fits
    assert gate.stats()["spent_usd"] == pytest.approx(0.75)


def test_gate_pause_blocks_everyone_until_retry_after():
    gate = JobGate()
    gate.pause(0.2)
    assert gate.acquire(1, 1, 0)["granted"] == 0
    time.sleep(0.25)
    assert gate.acquire(1, 1, 0)["granted"] == 1


def test_parse_steps_and_truncation():
    q = "Tom has 3 apples.\nHow many?"
    assert parse_step(reasoning_prompt(q)) == (1, q, None)
    assert parse_step(answer_prompt(q, " He has 3.")) == (2, q, " He has 3.")
    multiarith = reasoning_prompt(q) + " He has 3. Therefore, the answer (arabic numerals) is"
    assert parse_step(multiarith) == (2, q, " He has 3.")
    with pytest.raises(ValueError):
        parse_step("Hello there")
    assert parse_chat([{"role": "user", "content": reasoning_prompt(q)}]) == (1, q, None)
    assert truncate_tokens("one two three four", 2) == ("one two", "length")
    assert truncate_tokens("one two", 2) == ("one two", "stop")


def test_rows_expand_and_finish_with_the_papers_prompts():
    rows = expand_rows([{"sample_index": 4, "question": "Q?", "answer": "7", "split": "train", "dataset": "x"}], 3)
    assert [(r["sample_index"], r["sample_idx"]) for r in rows] == [(4, 0), (4, 1), (4, 2)]
    t = TeacherConfig(model="m", temperature=0.7)
    row = finish_row(rows[1], t, StepResult(text=" It is 7.", finish_reason="stop", prompt_tokens=5, completion_tokens=4,
                                            attempts=1), StepResult(text=" 7.", prompt_tokens=9, completion_tokens=2, attempts=2))
    assert tuple(row) == COMPLETION_COLUMNS
    assert row["reasoning_prompt"] == "Q: Q?\nA: Let's think step by step."
    assert row["answer_prompt"] == "Q: Q?\nA: Let's think step by step. It is 7.\nTherefore, the answer is"
    assert (row["prompt_tokens"], row["completion_tokens"], row["attempts"], row["error"]) == (14, 6, 3, None)
    failed = finish_row(rows[0], t, StepResult(error="gave up after 5 attempts: 429 rate limited", attempts=5), None)
    assert failed["rationale"] is None and failed["error"].startswith("step 1: gave up")


def test_request_ceilings_price_the_worst_case():
    t = TeacherConfig(model="m", prices={"m": {"input": 1.0, "output": 2.0}}, max_tokens=100, answer_max_tokens=10)
    tokens, cost = request_ceilings([{"question": "x" * 300}], t)
    assert tokens > 300 / 3 + 100 and cost == pytest.approx(((tokens - 100) * 1.0 + 100 * 2.0) / 1e6)


def test_keys_never_show(monkeypatch):
    s = Secret("sk-very-secret-123")
    assert "sk-very" not in repr(s) and "sk-very" not in f"{s}"
    assert redact("bad key sk-very-secret-123 given", s) == "bad key *** given"
    monkeypatch.delenv("FTCOT_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(TeacherSetupError, match="FTCOT_TEST_NO_SUCH_KEY"):
        api_key_from_env("FTCOT_TEST_NO_SUCH_KEY", "https://api.openai.com/v1")
    assert api_key_from_env("FTCOT_TEST_NO_SUCH_KEY", "http://127.0.0.1:8000/v1").get() == "EMPTY"


def test_sim_endpoint_id_ignores_faults_and_delays_not_answers():
    a = sim_endpoint_id(TeacherSimConfig(error_rate=0.1))
    assert a == sim_endpoint_id(TeacherSimConfig(error_rate=0.1, latency_ms=50, rate_500=0.2, batch_delay_s=9))
    assert a != sim_endpoint_id(TeacherSimConfig(error_rate=0.2)) != sim_endpoint_id(TeacherSimConfig(seed=4))
    assert a != sim_endpoint_id(TeacherSimConfig(error_rate=0.1), model="other-name")


@pytest.mark.shared
def test_import_authors_multiarith_is_a_complete_teach_stage(shared_datasets, tmp_path):
    src = shared_datasets / AUTHORS / "D_multiarith.json"
    split_file = shared_datasets / "reasoning-teacher/data/split/multiarith__default.json"
    out = tmp_path / "teach" / "imported"
    summary = import_reasoning_teacher(src, out, split_file=split_file)
    assert is_complete(out) and read_manifest(out)["stage"] == "teach"
    rows = read_jsonl(out / "completions.jsonl")
    assert summary["questions"] == 600 and summary["rows"] == len(rows) == 792
    assert summary["train_questions"] == 420 and summary["test_questions"] == 180
    raw = json.loads(src.read_text())["data"]
    first = raw["0"][0]
    r0 = rows[0]
    assert (r0["sample_index"], r0["sample_idx"]) == (0, 0)
    assert r0["answer_prompt"] == first["prompt"] and r0["rationale"] == first["reasoning_completion"]
    assert r0["answer_completion"] == first["completion"] and r0["model"] == "text-davinci-002"
    extra = [k for k, v in raw.items() if len(v) > 1][0]
    assert sorted(r["sample_idx"] for r in rows if r["sample_index"] == int(extra)) == list(range(len(raw[extra])))
    split = json.loads(split_file.read_text())
    assert {r["sample_index"] for r in rows if r["split"] == "train"} == set(split["train"])
    assert tuple(rows[0]) == COMPLETION_COLUMNS and rows[0]["cost_usd"] is None  # unknown, not zero


@pytest.mark.shared
def test_import_without_split_file_uses_the_papers_split(shared_datasets, tmp_path):
    src = shared_datasets / AUTHORS / "D_addsub.json"
    split = json.loads((shared_datasets / "reasoning-teacher/data/split/addsub__default.json").read_text())
    import_reasoning_teacher(src, tmp_path / "imp")
    rows = read_jsonl(tmp_path / "imp" / "completions.jsonl")
    assert sorted(r["sample_index"] for r in rows if r["split"] == "test") == split["test"]


@pytest.mark.shared
def test_replay_index_matches_step2_whatever_trigger_follows(shared_datasets):
    idx = ReplayIndex(shared_datasets / AUTHORS / "D_multiarith.json")
    rec = json.loads((shared_datasets / AUTHORS / "D_multiarith.json").read_text())["data"]["0"][0]
    q = rec["question"]
    assert idx.answer(1, q, None, 0) == (rec["reasoning_completion"], rec["reasoning_finish_reason"])
    # Our step-2 prompt uses "\nTherefore, the answer is"; the file's used " ... (arabic numerals) is".
    step, q2, rationale = parse_step(answer_prompt(q, rec["reasoning_completion"]))
    assert idx.answer(step, q2, rationale, 0)[0] == rec["completion"]


@pytest.mark.shared
def test_cli_teach_import(shared_datasets, tmp_path, capsys):
    from ftcot_ray import cli

    src = shared_datasets / AUTHORS / "D_coin_flip.json"
    out = tmp_path / "imported"
    assert cli.main(["teach", "import", "--from", "reasoning-teacher", str(src), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 532 and summary["extra_samples"] == 32 and is_complete(out)
    assert cli.main(["teach", "import", "--from", "somewhere-else", str(src), "--out", str(out)]) == 2
