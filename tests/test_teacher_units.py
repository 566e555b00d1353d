"""Teacher logic without Ray or HTTP: the request spec and its keys, the answer store (blocks, journals,
the index), the job gate, prompt parsing, rows, the importer."""

from __future__ import annotations

import json
import time

import pytest

from ftcot_ray.artifacts import is_complete, read_manifest
from ftcot_ray.config import TeacherConfig, TeacherSimConfig
from ftcot_ray.tables import read_table
from ftcot_ray.prompts import answer_prompt, reasoning_prompt
from ftcot_ray.schemas import COMPLETION_COLUMNS
from ftcot_ray.teacher.answers import AnswerStore, key16, read_journal
from ftcot_ray.teacher.client import Secret, StepResult, api_key_from_env, redact, TeacherSetupError
from ftcot_ray.teacher.fanout import finish_row, request_ceilings, worker_plan
from ftcot_ray.teacher.spec import RequestSpec, request_key
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


def test_the_spec_builds_every_key_and_groups_samples_in_one_place():
    t = TeacherConfig(model="m", temperature=0.7, max_tokens=100, answer_max_tokens=10)
    spec = RequestSpec.of(t, "https://api.x/v1")
    q = "Q?"
    assert spec.step1_key(q, 2) == request_key("https://api.x/v1", "completions", "m", reasoning_prompt(q),
                                               {"temperature": 0.7, "top_p": 1.0, "max_tokens": 100}, 2)
    assert spec.step2_key(q, " It is 7.", 2) == request_key(
        "https://api.x/v1", "completions", "m", answer_prompt(q, " It is 7."),
        {"temperature": 0.7, "top_p": 1.0, "max_tokens": 10}, 2)
    assert spec.groups([0, 1, 2], 1) == [[0], [1], [2]]
    with_n = RequestSpec.of(t.model_copy(update={"use_n": True}), "e")
    assert with_n.groups([1, 2, 3], 1) == [[1, 2, 3]] and with_n.groups([0, 2], 1) == [[0], [2]]
    assert with_n.groups([1, 2], 2) == [[1], [2]]  # step-2 prompts differ per sample: never one n-request
    assert with_n.seed([3, 4]) == 3 and RequestSpec.of(t.model_copy(update={"seed_param": False}), "e").seed([3]) is None


def _answer(key: str, text: str) -> dict:
    return {"key": key, "text": text, "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 4,
            "cost_usd": 0.0, "attempts": 1, "created": time.time()}


def test_answers_go_to_blocks_and_the_index_finds_them_newest_first(tmp_path):
    store = AnswerStore(tmp_path / "c")
    keys = [request_key("e", "completions", "m", f"p{i}", {}, 0) for i in range(10)]
    log = store.log(block_rows=4, flush_s=3600)
    for k in keys[:9]:
        log.sent([k])
        log.answered(_answer(k, f"old {k[:4]}"))
        if log.due():
            log.flush()
    assert len(store.block_names()) == 2  # two full blocks of 4; the 9th answer waits in the journal
    log.close()
    assert len(store.block_names()) == 3 and not list(store.journals.glob("*.jsonl"))
    store.write_block([_answer(keys[0], "newer")])  # the same key answered again later: the newer wins
    index = store.build_index()
    assert len(index) == 10
    got = index.get_many(keys)
    assert set(got) == set(keys[:9]) and got[keys[0]]["text"] == "newer" and got[keys[5]]["text"] == f"old {keys[5][:4]}"
    assert index.where([keys[9]]) == [None]
    assert (key16(keys[:2]) == [bytes.fromhex(k[:32]) for k in keys[:2]]).all()


def test_a_killed_workers_journal_is_recovered_and_names_what_was_on_the_wire(tmp_path):
    import subprocess
    import sys

    store = AnswerStore(tmp_path / "c")
    keys = [request_key("e", "completions", "m", f"p{i}", {}, 0) for i in range(5)]
    # A worker in its own process answers 3, has 2 on the wire, and is killed (its lock dies with it).
    code = f"""
import sys, time, os, signal
from ftcot_ray.teacher.answers import AnswerStore
log = AnswerStore({str(tmp_path / 'c')!r}).log(block_rows=100)
keys = {keys!r}
log.sent(keys)
for k in keys[:3]:
    log.answered({{"key": k, "text": "t" + k[:3], "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
                  "cost_usd": 0.0, "attempts": 1, "created": 0.0}})
log.failed([keys[3]])
os.kill(os.getpid(), signal.SIGKILL)
"""
    subprocess.run([sys.executable, "-c", code], timeout=60)
    live = store.log()  # a live worker's journal is never taken
    live.answered(_answer(request_key("e", "completions", "m", "live", {}, 0), "x"))
    assert store.block_names() == []
    found = store.recover_orphans()
    assert found["answers"] == 3 and found["on_wire"] == {keys[4]}  # keys[3] failed: not on the wire
    assert set(store.build_index().get_many(keys)) == set(keys[:3])
    assert live.path.exists()  # untouched
    records, sent = read_journal(live.path)
    assert len(records) == 1 and not sent
    live.close()


def test_a_cache_of_files_from_before_blocks_is_migrated_once(tmp_path):
    root = tmp_path / "c"
    old = [request_key("e", "completions", "m", f"p{i}", {}, 0) for i in range(3)]
    for i, k in enumerate(old):  # one and two folder levels, as older versions wrote them
        path = root / k[:2] / (f"{k}.json" if i else f"{k[2:4]}/{k}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"text": f" old {i}", "finish_reason": "stop"}))
    (root / "batches").mkdir()
    (root / "batches" / "ledger.json").write_text("{}")  # not an answer
    store = AnswerStore(root)
    assert len(store.legacy_files()) == 3
    assert store.migrate_legacy() == 3 and store.migrate_legacy() == 0
    assert {k: v["text"] for k, v in store.build_index().get_many(old).items()} == {k: f" old {i}" for i, k in enumerate(old)}
    assert not list(root.glob("??/*.json")) and (root / "batches" / "ledger.json").exists()


def test_gate_rpm_grants_a_burst_then_makes_callers_wait():
    gate = JobGate(rpm=120)  # 2/s: a bucket of 2
    first = gate.acquire([1] * 10, 0)
    assert first["granted"] == 2
    nxt = gate.acquire([1] * 10, 0)
    assert nxt["granted"] == 0 and 0 < nxt["wait_s"] <= 0.6


def test_gate_rate_limits_hold_in_every_minute_window():
    """A bucket holds a second's worth and refills at (limit - burst) a minute: a 60 s window never sees
    more than the limit, however the grants are timed."""
    from ftcot_ray.teacher.limiter import TokenBucket

    bucket = TokenBucket(600)  # 10/s burst, refilled at 590/min
    assert bucket.capacity == 10 and bucket.rate * 60 + bucket.capacity == pytest.approx(600)
    now = bucket.t
    grants = []  # (time, n) over two simulated minutes, taking all it offers every 0.1 s
    for i in range(1200):
        t = now + i * 0.1
        n = bucket.available(1.0, t)
        bucket.take(n, 1.0)
        grants.append((t, n))
    for start in range(0, 600, 7):
        window = sum(n for t, n in grants if grants[start][0] <= t < grants[start][0] + 60)
        assert window <= 600


def test_gate_tpm_charges_the_estimate_and_the_reply_corrects_it():
    gate = JobGate(tpm=6000)  # 100 tokens a second's burst
    assert gate.acquire([40, 40, 40], 0)["granted"] == 2
    assert gate.acquire([40], 0)["granted"] == 0
    gate.report({"tpm_correction": -60})  # the two used 10 tokens each, not 40: 60 back
    assert gate.acquire([40], 0)["granted"] == 1


def test_gate_budget_stops_before_it_would_be_exceeded():
    gate = JobGate(budget_usd=1.0, spent_usd=0.25)
    assert gate.acquire([1] * 10, 0.3)["granted"] == 2  # 0.25 + 2 x 0.3 <= 1 < 0.25 + 3 x 0.3
    waiting = gate.acquire([1], 0.3)
    assert waiting["granted"] == 0 and not waiting["budget_stop"]  # reservations in flight may free money
    gate.report({"cost_usd": 0.5, "released_usd": 0.6})  # the two calls cost 0.25 each
    assert gate.acquire([1] * 5, 0.3)["granted"] == 0 and gate.budget_stopped  # 0.75 spent: 0.3 no longer fits
    assert gate.stats()["spent_usd"] == pytest.approx(0.75)


def test_gate_pause_blocks_everyone_until_retry_after():
    gate = JobGate()
    gate.pause(0.2)
    assert gate.acquire([1], 0)["granted"] == 0
    time.sleep(0.25)
    assert gate.acquire([1], 0)["granted"] == 1


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


def test_rows_finish_with_the_papers_prompts():
    rows = [{"sample_index": 4, "question": "Q?", "answer": "7", "split": "train", "sample_idx": i} for i in range(3)]
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
    tokens, cost = request_ceilings(300, t)
    assert tokens > 300 / 3 + 100 and cost == pytest.approx(((tokens - 100) * 1.0 + 100 * 2.0) / 1e6)


def test_worker_plan_keeps_twice_each_workers_share_in_flight():
    t = TeacherConfig(concurrency=256, batch_size=64, samples=1)
    plan = worker_plan(t, 1_000_000, cpus=2)
    # Ray Data runs 4 batches of one task at once: tasks x 4 batches x 64 questions >= 2 x 256 requests.
    assert plan["workers"] == 1 and plan["per_worker"] == 256 and plan["tasks_in_flight"] * 4 * 64 >= 2 * 256
    assert worker_plan(t.model_copy(update={"num_actors": 4}), 1_000_000, cpus=2)["per_worker"] == 64
    assert worker_plan(t.model_copy(update={"num_actors": 4}), 300, cpus=2)["workers"] == 2  # never more than blocks


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
    rows = read_table(out, "completions")
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
    rows = read_table(tmp_path / "imp", "completions")
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
