"""`ftcot report`: table, results.json, PNGs with the expected series, MLflow file store, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftcot_ray.artifacts import finish
from ftcot_ray.config import load_config
from ftcot_ray.io import write_jsonl
from ftcot_ray.stages import report

SMALL, BASE = 1_000_000, 4_000_000


def _eval(run: Path, key: str, **metrics) -> None:
    cfg = load_config(None, [f"run_dir={run}"])
    d = run / "eval" / key
    d.mkdir(parents=True)
    base = {"dataset": "coin_flip_synth", "split": "test", "n": 100, "k": 1, "well_formed": 1.0,
            "mean_output_tokens": 20.0, "examples_per_s": 50.0, "diversity": None}
    m = base | metrics
    m["correct"] = round(m["accuracy"] * m["n"])
    (d / "metrics.json").write_text(json.dumps(m))
    finish(d, cfg, "eval")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    _eval(run, "a", method="ft_cot", diversity=1, student="gpt2-tiny", params=SMALL, accuracy=0.80)
    _eval(run, "b", method="ft_cot", diversity=2, student="gpt2-tiny", params=SMALL, accuracy=0.85)
    _eval(run, "c", method="ft_cot", diversity=4, student="gpt2-tiny", params=SMALL, accuracy=0.90)
    _eval(run, "d", method="vanilla", student="gpt2-tiny", params=SMALL, accuracy=0.50)
    _eval(run, "e", method="ft_cot", diversity=1, student="gpt2-base", params=BASE, accuracy=0.95)
    _eval(run, "f", method="ft_cot", diversity=1, student="gpt2-tiny", params=SMALL, accuracy=0.85, k=5,
          accuracy_at_1=0.80, accuracy_at_k=0.85)
    _eval(run, "g", method="ft_cot", diversity=1, student="gpt2-tiny", params=SMALL, accuracy=0.70, split="val")
    (run / "eval" / "partial").mkdir()  # unfinished eval (no manifest): ignored
    (run / "eval" / "partial" / "metrics.json").write_text(json.dumps({"method": "ft_cot", "accuracy": 0.0}))
    # The teacher's row comes from curate: 3 of 4 test rows right at sample_idx 0; two D folders, one row.
    cfg = load_config(None, [f"run_dir={run}", "data.dataset=coin_flip_synth"])
    for key in ("d1", "d4"):
        c = run / "curate" / key
        rows = [{"sample_index": i, "sample_idx": 0, "split": "test", "correct": i != 0, "prediction": "yes",
                 "error": None, "model": "sim-teacher"} for i in range(4)]
        rows += [{"sample_index": 9, "sample_idx": 1, "split": "test", "correct": False, "prediction": "no",
                  "error": None, "model": "sim-teacher"}]
        write_jsonl(c / "curated.jsonl", rows)
        finish(c, cfg, "curate")
    return run


def test_rows_and_table(run_dir):
    rows = report.collect_rows(run_dir)
    names = [r["name"] for r in rows]
    assert names.count("Teacher") == 1  # shared by every D: kept once
    teacher = next(r for r in rows if r["method"] == "teacher")
    assert teacher["accuracy"] == 0.75 and teacher["n"] == 4
    assert "FT-CoT + diverse (D=4)" in names and "Vanilla FT" in names and "Fine-tune-CoT (vote@5)" in names
    assert len(rows) == 8  # 7 finished evals + teacher; the partial one is skipped
    table = report.results_table(rows)
    assert table.splitlines()[0].startswith("| name |") and "0.9000" in table and "FT-CoT + diverse (D=2)" in table


def test_report_files_and_plot_series(run_dir):
    from PIL import Image

    rep = report.run_report(run_dir)
    assert Path(rep["report_md"]).read_text().count("|") > 20
    results = json.loads((run_dir / "results.json").read_text())
    plots = results["plots"]
    assert set(plots) == {report.PLOT_METHOD, report.PLOT_DIVERSITY, report.PLOT_SIZE, report.PLOT_COST}
    # accuracy vs inference cost: one point per student row (mean generated tokens, accuracy)
    assert plots[report.PLOT_COST]["Vanilla FT"] == [[20.0, 0.5]]
    # accuracy vs D: one line for the tiny student over D = 1, 2, 4 (the base student has only D = 1);
    # the vote@5 and the validation rows are not on it.
    assert plots[report.PLOT_DIVERSITY]["gpt2-tiny"] == [[1, 0.8], [2, 0.85], [4, 0.9]]
    assert plots[report.PLOT_SIZE]["Fine-tune-CoT"] == [[SMALL, 0.8], [BASE, 0.95]]
    bars = {label: pts[0][1] for label, pts in plots[report.PLOT_METHOD].items()}
    assert bars["Teacher"] == 0.75 and bars["Vanilla FT [gpt2-tiny]"] == 0.5
    assert not any("0.7" == str(v) for v in bars.values())  # the val row is not plotted (test split)
    for name in plots:
        img = Image.open(run_dir / name)
        img.load()
        assert img.format == "PNG" and img.size == (800, 450)
        assert f"]({name})" in Path(rep["report_md"]).read_text()


def test_figure_holds_the_series(run_dir):
    rows = [r for r in report.collect_rows(run_dir) if r["split"] == "test"]
    series = report.plot_series(rows)
    fig = report.draw(report.PLOT_DIVERSITY, series[report.PLOT_DIVERSITY])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"gpt2-tiny", "gpt2-base"}
    tiny = lines["gpt2-tiny"]
    assert list(tiny.get_xdata()) == [1, 2, 4] and list(tiny.get_ydata()) == pytest.approx([80, 85, 90])
    fig = report.draw(report.PLOT_METHOD, series[report.PLOT_METHOD])
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([v[0][1] * 100 for v in series[report.PLOT_METHOD].values()])


def test_single_student_single_d_has_no_diversity_or_size_plot(tmp_path):
    run = tmp_path / "run"
    _eval(run, "a", method="ft_cot", diversity=1, student="gpt2-tiny", params=SMALL, accuracy=0.8)
    rep = report.run_report(run)
    assert [Path(p).name for p in rep["plots"]] == [report.PLOT_METHOD]
    # a second method adds the accuracy-vs-inference-tokens plot, still no D or size plot
    _eval(run, "b", method="vanilla", student="gpt2-tiny", params=SMALL, accuracy=0.5, mean_output_tokens=2.0)
    rep = report.run_report(run)
    assert [Path(p).name for p in rep["plots"]] == [report.PLOT_METHOD, report.PLOT_COST]


def test_mlflow_file_store(run_dir, tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    cfg = load_config(None, [f"run_dir={run_dir}", f"report.mlflow_uri=file:{store}", "report.mlflow_experiment=t"])
    rep = report.run_report(run_dir, cfg)
    assert rep["mlflow_run_id"]
    logged = list(store.rglob("metrics/accuracy"))
    assert len(logged) == 8  # one nested run per row
    values = sorted(float(p.read_text().split()[1]) for p in logged)
    assert values == sorted(r["accuracy"] for r in rep["rows"])
    assert list(store.rglob(f"artifacts/{report.PLOT_DIVERSITY}"))


def test_cli(run_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ftcot_ray", "report", str(run_dir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| name |" in r.stdout and (run_dir / "report.md").is_file()
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 8
    r = subprocess.run([sys.executable, "-m", "ftcot_ray", "report", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr
