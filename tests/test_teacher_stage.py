"""The teach stage for real: teacher-sim over HTTP on 127.0.0.1, inside a real local Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcot_ray import cli
from ftcot_ray.artifacts import MANIFEST, stage_dir
from ftcot_ray.config import TeacherSimConfig, dump_config
from ftcot_ray.tables import read_table
from ftcot_ray.stages import teach
from ftcot_ray.teacher.client import TeacherSetupError
from ftcot_ray.teacher.sim import running_sim

from helpers_teacher import add_problems, make_cfg, register_add_task, sim_stats, write_data_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task():
    register_add_task()


def _table(cfg) -> list[dict]:
    return read_table(stage_dir(cfg, "teach"), "completions")


def test_two_step_prompts_d_samples_and_20pct_faults_leave_no_row_missing(ray_session, tmp_path):
    faults = TeacherSimConfig(error_rate=0.3, rate_429=0.05, retry_after_s=0.05, rate_500=0.05, rate_malformed=0.05,
                         rate_timeout=0.05, hang_s=3, seed=11)
    with running_sim(faults) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.samples": 3, "teacher.timeout_s": 1, "teacher.max_attempts": 4})
        problems = add_problems(12)
        write_data_stage(cfg, problems)
        summary = teach.run(cfg, progress=False)
        rows = _table(cfg)
        stats = sim_stats(url)
    assert sum(stats["faults"].values()) > 0 and stats["max_answers_per_prompt_sample"] == 1
    assert [(r["sample_index"], r["sample_idx"]) for r in rows] == [(p["sample_index"], i) for p in problems for i in range(3)]
    assert summary["rows"] == 36 and summary["ok"] + summary["errors"] == 36 and summary["retries"] > 0
    for r, p in zip(rows, [p for p in problems for _ in range(3)]):
        assert r["question"] == p["question"] and r["split"] == p["split"]
        assert r["reasoning_prompt"] == f"Q: {p['question']}\nA: Let's think step by step."
        if r["error"] is None:
            assert r["answer_prompt"] == f"{r['reasoning_prompt']}{r['rationale']}\nTherefore, the answer is"
            assert r["answer_completion"] and r["attempts"] >= 2
        else:
            assert r["error"].startswith("step")
    by_q = {}
    for r in rows:
        by_q.setdefault(r["sample_index"], set()).add(r["rationale"])
    assert any(len(v) > 1 for v in by_q.values())  # temperature 0.7: the D samples differ


def test_chat_api_and_reruns_send_nothing(ray_session, tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.0)) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.api": "chat"})
        write_data_stage(cfg, add_problems(6))
        first = teach.run(cfg, progress=False)
        sent = sim_stats(url)["requests"]["/v1/chat/completions"]
        assert first["ok"] == 12 and sent == 24  # 6 questions x 2 samples x 2 steps
        row = _table(cfg)[0]
        assert row["answer_completion"].strip(" .") == row["rationale"].rstrip(".").split()[-1]
        assert teach.run(cfg, progress=False)["reused"] is True  # finished stage: no work
        asked = _table(cfg)
        (stage_dir(cfg, "teach") / MANIFEST).unlink()  # an unfinished stage whose answers are all cached
        again = teach.run(cfg, progress=False)
        assert again["cache_hits"] == 24 and again["requests"] == 0  # both steps of 12 rows, from the store
        assert sim_stats(url)["requests"]["/v1/chat/completions"] == sent
    # The table rebuilt from the cache alone is the table the requests gave, but for `attempts`
    # (none were made this time).
    rebuilt = _table(cfg)
    assert [r | {"attempts": None} for r in rebuilt] == [r | {"attempts": None} for r in asked]
    assert all(r["attempts"] == 0 for r in rebuilt) and all(r["attempts"] == 2 for r in asked)


def test_budget_stops_early_and_a_higher_budget_resumes(ray_session, tmp_path, capsys):
    with running_sim(TeacherSimConfig(error_rate=0.0)) as url:
        prices = {"teacher.prices": {"ftcot-sim-teacher": {"input": 1000.0, "output": 1000.0}}}  # $0.001 per token
        cfg = make_cfg(tmp_path, url, **prices, **{"teacher.budget_usd": 2.0, "teacher.samples": 2})
        write_data_stage(cfg, add_problems(20))
        s = teach.run(cfg, progress=False)
        assert s["budget_stopped"] and 0 < s["ok"] < 40 and s["budget_unsent"] == s["errors"]
        assert s["table_cost_usd"] <= 2.0
        assert "budget" in capsys.readouterr().err
        unsent = [r for r in _table(cfg) if r["error"]]
        # A rationale that was paid for always got its answer: only whole rows are left unsent.
        assert all(r["error"].startswith("step 1: budget") and r["attempts"] == 0 for r in unsent)
        answered = sim_stats(url)["answered"]
        assert answered < 80
        more = teach.run(make_cfg(tmp_path, url, **prices, **{"teacher.budget_usd": 100.0, "teacher.samples": 2}),
                         progress=False)
        assert more["ok"] == 40 and not more["budget_stopped"]
        assert sim_stats(url)["max_answers_per_prompt_sample"] == 1


def test_bad_key_and_dead_endpoint_fail_fast_and_clearly(ray_session, tmp_path, monkeypatch, port, capsys):
    monkeypatch.setenv("FTCOT_SIM_KEY", "sk-right-key-42")
    monkeypatch.setenv("FTCOT_WRONG_KEY", "sk-wrong-key-77")
    with running_sim(TeacherSimConfig(require_key_env="FTCOT_SIM_KEY")) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.api_key_env": "FTCOT_WRONG_KEY"})
        write_data_stage(cfg, add_problems(3))
        t0 = time.time()
        with pytest.raises(TeacherSetupError, match=r"rejected the API key from \$FTCOT_WRONG_KEY") as e:
            teach.run(cfg, progress=False)
        assert "sk-wrong" not in str(e.value) and time.time() - t0 < 10
        assert sim_stats(url)["requests"] == {"/v1/models": 1}
    dead = make_cfg(tmp_path, f"http://127.0.0.1:{port}/v1")
    write_data_stage(dead, add_problems(3))
    path = tmp_path / "dead.yaml"
    dump_config(dead, path)
    assert cli.main(["teach", "--config", str(path)]) == 2
    assert f"cannot reach the teacher at http://127.0.0.1:{port}/v1" in capsys.readouterr().err


def test_sigkill_of_the_driver_stops_every_request_leaves_no_process_and_the_rerun_asks_once(ray_session, tmp_path):
    """The acceptance test of a kill: `ftcot teach` starts its own local Ray (so its reaper watches
    it); the sim runs here, outside the killed run, so it can be asked afterwards."""
    import psutil

    # Answers take 2 s: requests on the wire at the kill are still there when the reaper strikes.
    with running_sim(TeacherSimConfig(error_rate=0.2, latency_ms=2000)) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.concurrency": 8})
        write_data_stage(cfg, add_problems(8))
        path = tmp_path / "cfg.yaml"
        dump_config(cfg, path)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "ftcot_ray.cli", "teach", "--config", str(path), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, tree = time.time() + 120, []
        while time.time() < deadline:
            s = sim_stats(url)
            if s["answered"] >= 8 and (s["seconds_since_last_answer"] or 0) > 0.2 and s["in_flight"] > 0:
                tree = psutil.Process(proc.pid).children(recursive=True)  # raylet, GCS, agents, actors...
                tree += [p for p in psutil.process_iter(["cmdline"])  # ...and the reaper watching them
                         if p.info["cmdline"] and p.info["cmdline"][-2:] == ["ftcot_ray.reaper", str(proc.pid)]]
                break
            time.sleep(0.05)
        assert tree and any("raylet" in p.name() for p in tree), f"the run never got going: {sim_stats(url)}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        time.sleep(2.0)
        after_2s = sim_stats(url)["total_requests"]
        time.sleep(2.0)
        assert sim_stats(url)["total_requests"] == after_2s  # nobody is sending any more
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, p.name()) for p in left]
        assert time.time() - killed_at < 10
        answered_before = sim_stats(url)["answered"]
        assert 0 < answered_before < 32 and not (stage_dir(cfg, "teach") / MANIFEST).exists()
        summary = teach.run(cfg, progress=False)  # the re-run, here on the test's Ray
        s = sim_stats(url)
    rows = _table(cfg)
    assert len(rows) == 16 and all(r["error"] is None for r in rows)
    assert len({(r["sample_index"], r["sample_idx"]) for r in rows}) == 16  # no duplicate row
    # Only what was on the wire at the kill is asked again (here: never answered, the client had
    # gone), and the summary counts it.
    assert s["answered_keys"] == 32 and s["answered"] == 32 and s["abandoned"] >= 1
    assert 1 <= summary["resent_after_interrupt"] <= 8 and summary["cache_hits"] > 0


def test_offline_quickstart_path_starts_its_own_simulated_teacher(ray_session, tmp_path):
    """No base_url: the stage starts `ftcot teacher-sim` (simulated coin flips) for itself."""
    from ftcot_ray.config import load_config
    from ftcot_ray.stages import data
    from ftcot_ray.tasks import get_task

    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "qs"), "data.train_size": 6, "data.test_size": 3,
                                     "teacher.samples": 2, "teacher.temperature": 0.7, "resources.num_cpus": 4,
                                     "pipeline.diversity": [1, 2]})
    data.run(cfg)
    summary = teach.run(cfg, progress=False)
    rows = _table(cfg)
    assert summary["rows"] == len(rows) == 18 and summary["errors"] == 0 and summary["endpoint"].startswith("teacher-sim")
    task = get_task("coin_flip_synth")
    graded = [task.is_correct(task.extract_answer(r["answer_completion"]), r["answer"]) for r in rows]
    assert sum(graded) >= len(rows) // 2  # error_rate 0.15: mostly right, by reading its own rationale
    assert teach.run(cfg, progress=False)["reused"] is True
