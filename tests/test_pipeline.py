"""`ftcot run` end to end at a reduced size: real local Ray, real teacher-sim over HTTP, real
Ray Train + DeepSpeed, real Ray Data evaluation; then skip-on-rerun, a partial re-run on a changed
parameter, resume after a kill, and the errors a user meets first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftcot_ray.artifacts import read_manifest, stage_dir
from ftcot_ray.config import load_config, with_overrides
from ftcot_ray.stages import pipeline
from ftcot_ray.tables import read_table

REPO = Path(__file__).resolve().parents[1]

# Small enough for the default suite: 3 students x 8 steps, 16 test questions.
SMALL = [
    "data.train_size=48", "data.test_size=16", "data.difficulty=3",
    "teacher.samples=2", "pipeline.diversity=[1,2]",
    "train.max_steps=8", "train.batch_size=4", "train.eval_every_steps=8", "train.val_max_new_tokens=64",
    "eval.max_new_tokens=64", "eval.batch_size=16",
]


def small_cfg(run_dir: Path, *extra: str):
    return load_config("quickstart", [f"run_dir={run_dir}", *SMALL, *extra])


def finished_at(cfg, stage: str) -> str:
    return read_manifest(stage_dir(cfg, stage))["finished_at"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_session):
    """The reduced quickstart through the real command line (its output is checked below), then the
    stage summaries read back in-process (every stage reused)."""
    run_dir = tmp_path_factory.mktemp("pipeline")
    cfg = small_cfg(run_dir)
    proc = subprocess.run([sys.executable, "-m", "ftcot_ray", "run", f"run_dir={run_dir}", *SMALL], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pipeline.run(cfg)
    return cfg, summary | {"output": proc.stdout + proc.stderr}


def test_the_command_prints_what_a_person_needs_and_logs_the_rest(first_run):
    cfg, summary = first_run
    out = summary["output"]
    lines = out.splitlines()
    assert len(lines) < 40, out  # stage lines, bars, the table (the quickstart: well under 100)
    for chatter in ("Failed to query Ray Train Controller", "INFO", "DeepSpeed", "Traceback", "Started a local Ray"):
        assert chatter not in out, chatter
    assert "| Fine-tune-CoT |" in out and "[ft_cot D=2] train:" in out and "selected_step" in out
    logs = list((Path(cfg.run_dir) / "logs").glob("run-*.log"))
    log = logs[0].read_text() if len(logs) == 1 else ""
    # the chatter is kept, in the run folder: Ray's own lines and what the training workers printed
    assert "Started a local Ray" in log and "(RayTrainWorker pid=" in log and "TrainController" in log, logs
    assert not list(Path(cfg.run_dir).glob("train/*/ray_train"))  # checkpoints are scratch: gone after export


def test_quickstart_end_to_end_writes_every_stage_and_the_report(first_run):
    cfg, summary = first_run
    run_dir = Path(cfg.run_dir)
    for stage in ("data", "teach"):
        assert (stage_dir(cfg, stage) / "manifest.json").is_file()
    labels = [label for label, _ in pipeline.variants(cfg)]
    assert labels == ["ft_cot D=1", "ft_cot D=2", "vanilla"]
    for label, c in pipeline.variants(cfg):
        assert (stage_dir(c, "train") / "student" / "model.safetensors").is_file()
        preds = read_table(stage_dir(c, "eval"), "predictions")
        assert len(preds) == 16, label  # every test question has a prediction
    # D=2 curates from the same teacher table, with up to 2 rationales per question.
    d1, d2 = summary["ft_cot D=1"]["curate"], summary["ft_cot D=2"]["curate"]
    assert d2["kept_rows"] > d1["kept_rows"]
    # The teacher was asked once: 64 questions x 2 samples x 2 steps.
    assert summary["teach"]["rows"] == 64 * 2
    results = json.loads((run_dir / "results.json").read_text())
    names = {r["name"] for r in results["rows"]} if isinstance(results, dict) else {r["name"] for r in results}
    assert {"Teacher", "Vanilla FT", "Fine-tune-CoT"} <= names
    assert (run_dir / "report.md").is_file()
    assert any(p.suffix == ".png" for p in run_dir.iterdir())


def test_rerun_of_a_finished_run_does_no_work(first_run):
    cfg, summary = first_run
    again = pipeline.run(cfg)
    assert again["teach"].get("reused") is True  # no teacher started, no request sent
    for label, _ in pipeline.variants(cfg):
        assert again[label]["train"].get("reused") is True, label
        assert again[label]["eval"].get("reused") is True, label
    assert again["report"]["table"] == summary["report"]["table"]


def test_changing_lr_reruns_train_and_eval_only(first_run):
    cfg, _ = first_run
    base = with_overrides(cfg, {"pipeline.diversity": [1], "pipeline.methods": ["ft_cot"]})
    before = {s: finished_at(base, s) for s in ("data", "teach")}
    changed = with_overrides(base, {"train.lr": 5e-4})
    assert stage_dir(changed, "curate") == stage_dir(base, "curate")
    assert stage_dir(changed, "train") != stage_dir(base, "train")
    summary = pipeline.run(changed)
    assert summary["teach"].get("reused") is True
    assert summary["ft_cot D=1"]["curate"].get("reused") is True
    assert not summary["ft_cot D=1"]["train"].get("reused")
    assert not summary["ft_cot D=1"]["eval"].get("reused")
    assert {s: finished_at(base, s) for s in ("data", "teach")} == before


def _env():
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")


def test_killed_run_resumes_where_it_stopped(tmp_path, ray_session):
    run_dir = tmp_path / "killed"
    cfg = small_cfg(run_dir, "pipeline.diversity=[1]", "pipeline.methods=[ft_cot]")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcot_ray", "run", f"run_dir={run_dir}", *SMALL,
         "pipeline.diversity=[1]", "pipeline.methods=[ft_cot]"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    train_root = run_dir / "train"
    deadline = time.time() + 300
    while not train_root.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before training started; nothing to kill"
    time.sleep(3)  # let Ray Train start its workers
    started = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any("raylet" in " ".join(p.cmdline()) for p in started)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray, its teacher-sim: everything at once
    proc.wait()
    # Nothing of the run is left (Ray's agents ignore SIGTERM and outlive a killed driver without the reaper).
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    assert not (stage_dir(cfg, "train") / "manifest.json").exists()
    teach_done = finished_at(cfg, "teach")

    summary = pipeline.run(cfg)
    assert summary["teach"].get("reused") is True
    assert finished_at(cfg, "teach") == teach_done  # finished work was kept, not redone
    assert (stage_dir(cfg, "train") / "manifest.json").is_file()
    assert (stage_dir(cfg, "eval") / "metrics.json").is_file()


def _ftcot(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "ftcot_ray", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_stage_with_missing_input_names_the_command_to_run(tmp_path):
    r = _ftcot("train", f"run_dir={tmp_path}")
    assert r.returncode == 2
    assert "curate" in r.stderr and "does not exist" in r.stderr and "ftcot curate" in r.stderr


def test_diversity_above_teacher_samples_is_refused_before_any_work(tmp_path):
    r = _ftcot("run", f"run_dir={tmp_path}", "teacher.samples=2", "pipeline.diversity=[1,4]")
    assert r.returncode == 2
    assert "pipeline.diversity [4] exceeds teacher.samples=2" in r.stderr
    assert not any(tmp_path.iterdir())


def test_plan_lists_stages_and_their_state(first_run):
    cfg, _ = first_run
    rows = pipeline.plan(cfg)
    assert [r["stage"] for r in rows][:2] == ["data", "teach"]
    assert all(r["done"] for r in rows)
    assert len([r for r in rows if r["stage"] == "train"]) == 3
