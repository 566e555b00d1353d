"""`ftcot tune` for real: a local Ray, a live teacher-sim on 127.0.0.1, 4 trials (D in {1, 2} x two
learning rates) of a tiny student on a tiny coin-flip task, each a real TorchTrainer reporting to Tune.

The search is started from the command line, SIGKILLed (its whole process group) once a trial has
finished and another is running, refused without --resume, then finished with `ftcot tune --resume`.
Then: the teacher received no request during the search, finished trials were not run again, the
registry holds the trial with the highest validation accuracy and loads with plain transformers,
a trial's config.yaml reproduces its train stage with `ftcot train --config`, every trial is an
MLflow run, and a failed trial is retried by Tune.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ftcot_ray.artifacts import stage_dir
from ftcot_ray.config import dump_config, load_config
from ftcot_ray.stages import tune as tune_stage
from ftcot_ray.tune import results
from ftcot_ray.tune.trial import read_attempts
from helpers_teacher import sim_stats
from helpers_train import load_and_generate

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# tests/test_pipeline.py's SMALL sizes (train.batch_size is GLOBAL), with two validations per trial.
SMALL = {
    "data.train_size": 48, "data.test_size": 16, "data.difficulty": 3,
    "teacher.samples": 2, "pipeline.diversity": [1, 2],
    "train.max_steps": 8, "train.batch_size": 4, "train.eval_every_steps": 4, "train.val_max_new_tokens": 64,
    "eval.max_new_tokens": 64, "eval.batch_size": 16,
}
SPACE = {"curate.diversity": "grid([1, 2])", "train.lr": "grid([1e-3, 3e-3])"}


def _env(ray_session) -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)


def _ftcot(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcot_ray", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _terminated(experiment: Path) -> set[str]:
    """Trials Tune's own saved state records as TERMINATED (what a restore keeps)."""
    done = set()
    for f in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        for state, _ in data.get("trial_data", []):
            s = json.loads(state)
            if s.get("status") == "TERMINATED":
                done.add(s["trial_id"])
    return done


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_session):
    """Teach once (before the search) against a live teacher-sim, then search, kill, resume."""
    from ftcot_ray.stages import data, teach
    from ftcot_ray.teacher.sim import running_sim

    tmp = tmp_path_factory.mktemp("tune")
    base = load_config("quickstart", {"run_dir": str(tmp / "run"), **SMALL})
    with running_sim(base.teacher.sim, model=base.teacher.model) as url:
        cfg = load_config("quickstart", {
            "run_dir": str(tmp / "run"), **SMALL, "teacher.base_url": url, "tune.search": "grid", "tune.space": SPACE,
            "report.mlflow_uri": f"file:{tmp / 'mlruns'}"})
        data.run(cfg)
        taught = teach.run(cfg, progress=False)
        before = sim_stats(url)
        config_file = tmp / "search.yaml"
        dump_config(cfg, config_file)
        env = _env(ray_session)
        out = tune_stage.search_dir(cfg)
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "ftcot_ray", "tune", "--config", str(config_file)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline, killed_after = time.time() + 900, None
        while time.time() < deadline and proc.poll() is None:
            done = _terminated(out / "ray_tune")
            started = {a["trial_id"] for a in read_attempts(out)}
            if done and started - done:  # one finished (and saved as such), another mid-trial
                killed_after = set(done)
                break
            time.sleep(0.5)
        assert killed_after, f"no point to kill at (exit {proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        refused = _ftcot(["tune", "--config", str(config_file)], env, timeout=120)
        resumed = _ftcot(["tune", "--config", str(config_file), "--resume"], env)
        wall = time.time() - t0
        after = sim_stats(url)
    return {"cfg": cfg, "out": out, "taught": taught, "before": before, "after": after, "refused": refused,
            "resumed": resumed, "killed_after": killed_after, "wall_s": wall, "config_file": config_file, "env": env}


def test_an_interrupted_search_is_not_silently_restarted(searched):
    r = searched["refused"]
    assert r.returncode == 2 and "ftcot tune --resume" in r.stderr and "interrupted search" in r.stderr, r.stderr


def test_resume_finishes_the_search_without_rerunning_finished_trials(searched):
    r = searched["resumed"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the search" in r.stderr
    out = searched["out"]
    rows = list(_csv(out / "trials.csv"))
    assert len(rows) == 4 and all(row["status"] == "finished" for row in rows), rows
    assert {(int(row["curate.diversity"]), float(row["train.lr"])) for row in rows} == {
        (1, 1e-3), (1, 3e-3), (2, 1e-3), (2, 3e-3)}
    starts = Counter(a["trial_id"] for a in read_attempts(out))
    for trial_id in searched["killed_after"]:
        assert starts[trial_id] == 1, (trial_id, starts)  # finished before the kill: never started again
    assert set(starts) == {row["trial_id"] for row in rows}
    assert (out / "manifest.json").is_file()
    print(f"\nsearch wall time incl. kill + resume: {searched['wall_s']:.0f} s\n" + (out / "trials.md").read_text())


def test_the_teacher_received_no_request_during_the_search(searched):
    assert searched["taught"]["rows"] == 64 * 2  # asked once, before the search, at D_max = 2
    before, after = searched["before"], searched["after"]
    assert before["total_requests"] > 0
    assert after["total_requests"] == before["total_requests"], (before["requests"], after["requests"])
    assert after["answered"] == before["answered"]


def test_the_registry_holds_the_trial_with_the_highest_val_accuracy(searched):
    cfg, out = searched["cfg"], searched["out"]
    rows = list(_csv(out / "trials.csv"))
    top = max(float(r["val_accuracy"]) for r in rows)
    entry = Path(cfg.run_dir) / "best" / cfg.data.dataset
    source = json.loads((entry / "registry.json").read_text())
    chosen = next(r for r in rows if r["trial_id"] == source["trial_id"])
    assert float(chosen["val_accuracy"]) == top
    best_losses = [float(r["val_loss"]) for r in rows if float(r["val_accuracy"]) == top]
    assert float(chosen["val_loss"]) == min(best_losses)  # ties go to the lower val loss
    val = json.loads((entry / "val_metrics.json").read_text())
    assert val["selection"]["val_accuracy"] == top and val["val_curve"]
    reg_cfg = yaml.safe_load((entry / "config.yaml").read_text())
    assert reg_cfg["curate"]["diversity"] == int(chosen["curate.diversity"])
    assert reg_cfg["train"]["lr"] == float(chosen["train.lr"])
    test = json.loads((entry / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["n"] == 16 and 0 <= test["accuracy"] <= 1
    # test was evaluated for the chosen student only
    evals = [json.loads(p.read_text()) for p in Path(cfg.run_dir).glob("eval/*/metrics.json")]
    assert len(evals) == 1 and evals[0]["accuracy"] == test["accuracy"]
    assert (out / "best_config.yaml").read_text() == Path(chosen["config"]).read_text()


def test_the_registry_folder_loads_with_plain_transformers(searched):
    cfg = searched["cfg"]
    entry = Path(cfg.run_dir) / "best" / cfg.data.dataset
    card = json.loads((entry / "ftcot_student.json").read_text())
    out = load_and_generate(entry, "decoder", "A coin is heads up. Ann flips the coin. Is the coin still heads up? ###")
    assert out["new_tokens"] > 0 and out["ray_or_deepspeed_imported"] == []
    assert card["dataset"] == cfg.data.dataset


def test_a_trial_config_reproduces_its_train_stage(searched):
    rows = list(_csv(searched["out"] / "trials.csv"))
    row = rows[0]
    trial_cfg = load_config(row["config"])
    r = _ftcot(["train", "--config", row["config"]], searched["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary.get("reused") is True and summary["student"] == str(stage_dir(trial_cfg, "train") / "student")
    assert trial_cfg.curate.diversity == int(row["curate.diversity"]) and trial_cfg.train.lr == float(row["train.lr"])


def test_outputs_plots_and_mlflow_runs(searched):
    out = searched["out"]
    for name in ("trials.csv", "trials.md", "best_config.yaml", "val_accuracy_vs_D.png", "val_accuracy_vs_lr.png"):
        assert (out / name).is_file(), name
    assert (out / "val_accuracy_vs_D.png").read_bytes()[:4] == b"\x89PNG"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=searched["cfg"].report.mlflow_uri)
    exp = client.get_experiment_by_name(searched["cfg"].report.mlflow_experiment)
    runs = client.search_runs([exp.experiment_id])
    names = {r.data.tags.get("trial_name") or r.info.run_name for r in runs}
    trial_ids = {row["trial_id"] for row in _csv(out / "trials.csv")}
    assert all(any(t in (n or "") for n in names) for t in trial_ids), names
    assert any("val_accuracy" in r.data.metrics for r in runs)


def test_a_finished_search_is_reused(searched):
    r = _ftcot(["tune", "--config", str(searched["config_file"])], searched["env"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["reused"] is True


def test_a_failed_trial_is_retried(searched, tmp_path):
    """Tune's FailureConfig: the trial's first attempt raises, its retry finishes (its train stage,
    the same as the main search's, is reused: only the retry is under test)."""
    from ftcot_ray.config import with_overrides

    cfg = with_overrides(searched["cfg"], {"tune.space": {"train.lr": "grid([1e-3])", "curate.diversity": "grid([1])"},
                                           "report.mlflow_uri": None})
    summary = tune_stage.run(cfg, fault={"marker": str(tmp_path / "failed-once")})
    assert (tmp_path / "failed-once").exists()
    rows = list(_csv(Path(summary["search_dir"]) / "trials.csv"))
    assert len(rows) == 1 and rows[0]["status"] == "finished" and rows[0]["attempts"] == "2", rows


def test_optuna_search_runs_through_tunes_integration(searched):
    """TPE over the main search's own grid points: its trials reuse those train stages (cheap), the
    searcher is Optuna's (its state is saved beside the experiment)."""
    from ftcot_ray.config import with_overrides

    cfg = with_overrides(searched["cfg"], {"tune.search": "optuna", "tune.num_samples": 3, "report.mlflow_uri": None,
                                           "tune.space": {"curate.diversity": "choice([1, 2])",
                                                          "train.lr": "choice([1e-3, 3e-3])"}})
    summary = tune_stage.run(cfg)
    out = Path(summary["search_dir"])
    rows = list(_csv(out / "trials.csv"))
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows), rows
    assert {(int(r["curate.diversity"]), float(r["train.lr"])) for r in rows} <= {(1, 1e-3), (1, 3e-3), (2, 1e-3), (2, 3e-3)}
    assert list((out / "ray_tune").glob("searcher-state-*")), sorted(p.name for p in (out / "ray_tune").iterdir())


def test_asha_stops_a_poor_trial_early(searched):
    """ASHA on val_loss (no ties, unlike a 10-question accuracy) at the step-4 rung: the good trial
    (the main search's, reused) reaches it first; a trial at lr 1e-6 is still at its initial loss there
    and is stopped: half-way, its train stage unfinished, and the search goes on to its end."""
    from ftcot_ray.config import with_overrides

    cfg = with_overrides(searched["cfg"], {"tune.scheduler": "asha", "tune.metric": "val_loss", "tune.grace_steps": 4,
                                           "tune.max_concurrent_trials": 1, "report.mlflow_uri": None,
                                           "tune.space": {"curate.diversity": "grid([1])",
                                                          "train.lr": "grid([3e-3, 1e-6])"}})
    summary = tune_stage.run(cfg)
    rows = {float(r["train.lr"]): r for r in _csv(Path(summary["search_dir"]) / "trials.csv")}
    assert rows[3e-3]["status"] == "finished"
    poor = rows[1e-6]
    assert poor["status"] == "stopped early (asha)" and poor["steps"] == "4", poor
    assert not (stage_dir(load_config(poor["config"]), "train") / "manifest.json").exists()
    assert summary["best_params"]["train.lr"] == 3e-3


def _csv(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)
