"""`teacher.mode=batch` against teacher-sim's Batch API over real HTTP (no Ray: batches run on the driver)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcot_ray.artifacts import stage_dir
from ftcot_ray.config import TeacherSimConfig, dump_config
from ftcot_ray.tables import read_table
from ftcot_ray.stages import teach
from ftcot_ray.teacher.batch import Ledger
from ftcot_ray.teacher.sim import running_sim

from helpers_teacher import add_problems, make_cfg, register_add_task, sim_stats, write_data_stage

REPO = Path(__file__).resolve().parents[1]
PRICES = {"teacher.prices": {"ftcot-sim-teacher": {"input": 2.0, "output": 8.0}}}
BATCH = {"teacher.mode": "batch", "teacher.batch_poll_s": 0.05}


@pytest.fixture(autouse=True)
def _task():
    register_add_task()


def _table(cfg) -> list[dict]:
    return read_table(stage_dir(cfg, "teach"), "completions")


def test_batch_run_gives_the_sync_runs_table_at_half_the_price(ray_session, tmp_path):
    problems = add_problems(10)
    with running_sim(TeacherSimConfig(error_rate=0.3, batch_delay_s=0.3)) as url:
        sync = make_cfg(tmp_path / "sync", url, **PRICES)
        write_data_stage(sync, problems)
        s_sum = teach.run(sync, progress=False)
        batch = make_cfg(tmp_path / "batch", url, **PRICES, **BATCH)
        write_data_stage(batch, problems)
        b_sum = teach.run(batch, progress=False)
        stats = sim_stats(url)
    a, b = _table(sync), _table(batch)
    assert len(a) == 20 and all(r["error"] is None for r in a + b)
    drop = lambda r: {k: v for k, v in r.items() if k != "cost_usd"}  # noqa: E731
    assert [drop(r) for r in b] == [drop(r) for r in a]
    assert sum(r["cost_usd"] for r in b) == pytest.approx(sum(r["cost_usd"] for r in a) / 2)
    assert b_sum["batches"] == 2 and b_sum["requests"] == 40 and b_sum["mode"] == "batch"
    assert b_sum["actual"]["requests"] == {"step1": 20, "step2": 20, "total": 40}
    assert stats["batches_created"] == 2 and stats["batch_lines_submitted"] == 40
    assert b_sum["cost_usd"] == pytest.approx(s_sum["cost_usd"] / 2, rel=1e-6)
    assert not list(Ledger(teach.cache_dir(batch)).root.glob("*.json"))  # all taken: nothing left to resume


def test_failed_and_expired_lines_become_error_rows_and_retry_errors_asks_them_again(tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.0, batch_delay_s=0.2, batch_line_error_rate=0.3)) as url:
        cfg = make_cfg(tmp_path, url, **BATCH)
        write_data_stage(cfg, add_problems(12))
        first = teach.run(cfg, progress=False)
        errors = [r for r in _table(cfg) if r["error"]]
        assert errors and first["errors"] == len(errors) and first["rows"] == 24
        assert all(r["error"].startswith(("step 1: batch line: HTTP 500", "step 2: batch line: HTTP 500")) for r in errors)
        assert all(r["answer_completion"] is None for r in errors)
        assert teach.run(cfg, progress=False)["reused"]  # a finished stage with errors is kept as is
        before = sim_stats(url)["batch_lines_submitted"]
        again = teach.run(cfg, retry_errors=True, progress=False)
        # Only the failed lines (and step 2 of a failed step 1) are asked again; answered ones come from the cache.
        step1_failed = sum(1 for r in errors if r["error"].startswith("step 1"))
        assert again["actual"]["requests"]["step1"] == step1_failed
        assert sim_stats(url)["batch_lines_submitted"] - before <= len(errors) + step1_failed
        assert again["errors"] < len(errors)
    with running_sim(TeacherSimConfig(error_rate=0.0, batch_delay_s=5.0, batch_expire_s=0.5)) as url:
        cfg = make_cfg(tmp_path / "exp", url, **BATCH)
        write_data_stage(cfg, add_problems(8))
        s = teach.run(cfg, progress=False)
        rows = _table(cfg)
        assert s["errors"] == 16 - sum(1 for r in rows if r["error"] is None) and s["errors"] > 0
        assert any("batch_expired" in r["error"] for r in rows if r["error"])


def test_sigkill_while_polling_then_rerun_submits_no_batch_or_line_twice(tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.0, batch_delay_s=3.0)) as url:
        cfg = make_cfg(tmp_path, url, **BATCH)
        write_data_stage(cfg, add_problems(10))
        path = tmp_path / "cfg.yaml"
        dump_config(cfg, path)
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "ftcot_ray.cli", "teach", "--config", str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and sim_stats(url)["batches_created"] < 1:
            time.sleep(0.05)
        time.sleep(0.3)  # it is polling now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert sim_stats(url)["batches_created"] == 1
        ledger = list(Ledger(teach.cache_dir(cfg)).root.glob("*.json"))
        assert len(ledger) == 1 and json.loads(ledger[0].read_text())["batch_id"]  # persisted at once
        summary = teach.run(cfg, progress=False)
        s = sim_stats(url)
    assert summary["batches_resumed"] == 1 and summary["batches"] == 1  # step 1 polled again, step 2 submitted
    assert s["batches_created"] == 2 and s["batch_lines_submitted"] == 40 and s["max_submissions_per_batch_line"] == 1
    assert s["max_answers_per_prompt_sample"] == 1 and all(r["error"] is None for r in _table(cfg))


def test_a_crash_between_upload_and_create_finds_the_batch_by_its_file(tmp_path):
    """The ledger holds the file id before the batch exists; a restart looks the batch up by it."""
    import io

    import openai

    from ftcot_ray.teacher.batch import BatchRun
    from ftcot_ray.teacher.client import Secret

    with running_sim(TeacherSimConfig(error_rate=0.0, batch_delay_s=0.2)) as url:
        cfg = make_cfg(tmp_path, url, **BATCH)
        problems = add_problems(3)
        write_data_stage(cfg, problems)
        run = BatchRun(cfg.teacher, base_url=url, endpoint_id=teach.endpoint_id(cfg), secret=Secret("x"),
                       cache_dir=str(teach.cache_dir(cfg)))
        lines = [run.line(run.spec.payload(p["question"]), 1, i)[1] for p in problems for i in range(2)]
        c = openai.OpenAI(base_url=url, api_key="x")
        f = c.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())),
                           purpose="batch")
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        run.ledger.write({"id": "crashed", "endpoint_id": run.endpoint_id, "base_url": url, "step": 1, "lines": 6,
                          "file_id": f.id, "batch_id": None, "created": 0})
        summary = teach.run(cfg, progress=False)
        s = sim_stats(url)
    assert summary["batches_resumed"] == 1 and s["batches_created"] == 2  # the found one, and step 2's
    assert s["max_submissions_per_batch_line"] == 1 and summary["ok"] == 6
