"""`ftcot report RUN_DIR`: one table and a few plots for every evaluation of a run.

Reads RUN_DIR/eval/*/metrics.json (finished stages only) and, for the teacher's row,
RUN_DIR/curate/*/ (its curated table, streamed); writes RUN_DIR/report.md, RUN_DIR/results.json and PNGs:
accuracy per method (bar), accuracy vs D (Fine-tune-CoT, one line per student), accuracy vs
student size (when several sizes were evaluated). Optional MLflow logging (`report.mlflow_uri`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from ..artifacts import is_complete, write_json
from ..config import Config
from ..errors import InputMissing
from ..evaluation import teacher_metrics
from ..io import read_json
from ..tables import has_table

METHOD_NAMES = {
    "teacher": "Teacher",
    "zero_shot": "Zero-shot",
    "zero_shot_cot": "Zero-shot-CoT",
    "few_shot_cot": "Few-shot-CoT",
    "vanilla": "Vanilla FT",
    "ft_cot": "Fine-tune-CoT",
    "step_by_step": "Distilling step-by-step",
}
METHOD_ORDER = list(METHOD_NAMES)
COLUMNS = ["name", "student", "params", "dataset", "split", "accuracy", "n", "correct", "well_formed",
           "selected_step", "val_accuracy", "mean_output_tokens", "examples_per_s", "k", "accuracy_at_1",
           "accuracy_at_k"]
PLOT_METHOD = "accuracy_by_method.png"
PLOT_DIVERSITY = "accuracy_vs_diversity.png"
PLOT_SIZE = "accuracy_vs_student_size.png"
PLOT_COST = "accuracy_vs_output_tokens.png"


# --------------------------------------------------------------------------- rows


def row_name(m: dict) -> str:
    """The paper's row labels; diverse reasoning is Fine-tune-CoT with D > 1."""
    method = m.get("method", "?")
    name = METHOD_NAMES.get(method, method)
    d = m.get("diversity")
    if method == "ft_cot" and d and d > 1:
        name = f"FT-CoT + diverse (D={d})"
    if method == "step_by_step" and d and d > 1:
        name = f"Step-by-step + diverse (D={d})"
    if m.get("k", 1) and m.get("k", 1) > 1:
        name += f" (vote@{m['k']})"
    return name


def collect_rows(run_dir: Path, split: Optional[str] = None) -> list[dict]:
    """Every finished evaluation of the run (+ the teacher's row from curate when no eval row has it)."""
    rows = []
    for mpath in sorted(run_dir.glob("eval/*/metrics.json")):
        if not is_complete(mpath.parent):
            continue
        m = read_json(mpath)
        rows.append(m | {"path": str(mpath.parent)})
    if not any(r.get("method") == "teacher" for r in rows):
        rows += _teacher_rows(run_dir, split or "test")
    for r in rows:
        r["name"] = row_name(r)
    rows.sort(key=lambda r: (METHOD_ORDER.index(r["method"]) if r.get("method") in METHOD_ORDER else 99,
                             r.get("diversity") or 0, r.get("params") or 0, str(r.get("student")), r.get("split", "")))
    return rows


def _teacher_rows(run_dir: Path, split: str) -> list[dict]:
    """The teacher's accuracy at sample_idx 0; every D shares it, so identical rows are kept once."""
    seen, rows = set(), []
    for cdir in sorted(run_dir.glob("curate/*")):
        if not (is_complete(cdir) and has_table(cdir, "curated")):
            continue
        try:
            m = teacher_metrics(cdir, split)
        except ValueError:  # the teacher was not asked on this split
            continue
        key = (m["dataset"], m["student"], m["n"], m["correct"])
        if key not in seen:
            seen.add(key)
            rows.append(m | {"path": str(cdir)})
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def results_table(rows: list[dict]) -> str:
    """A markdown table, one line per evaluation (accuracy etc. as fractions)."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_series(rows: list[dict]) -> dict[str, dict[str, list[list[float]]]]:
    """What each PNG shows, as {plot: {series label: [[x, y], ...]}} (also written to results.json)."""
    plots: dict[str, dict[str, list[list[float]]]] = {}
    students = {str(r.get("student")) for r in rows if r.get("method") != "teacher"}
    several = len(students) > 1
    bars: dict[str, list[list[float]]] = {}
    for r in rows:
        label = r["name"] + (f" [{r.get('student')}]" if several and r.get("method") != "teacher" else "")
        bars.setdefault(label, [[len(bars), r["accuracy"]]])
    plots[PLOT_METHOD] = bars
    ft = [r for r in rows if r.get("method") == "ft_cot" and r.get("diversity") and r.get("k", 1) == 1]
    by_student: dict[str, list[list[float]]] = {}
    for r in ft:
        by_student.setdefault(str(r.get("student")), []).append([r["diversity"], r["accuracy"]])
    if len({r["diversity"] for r in ft}) > 1:
        plots[PLOT_DIVERSITY] = {s: sorted(p) for s, p in by_student.items()}
    sized = [r for r in rows if r.get("params") and r.get("method") != "teacher" and r.get("k", 1) == 1]
    if len({r["params"] for r in sized}) > 1:
        by_method: dict[str, list[list[float]]] = {}
        for r in sized:
            by_method.setdefault(r["name"], []).append([r["params"], r["accuracy"]])
        plots[PLOT_SIZE] = {name: sorted(p) for name, p in by_method.items()}
    # Accuracy against what an answer costs at inference (its generated tokens), one point per student.
    students = [r for r in rows if r.get("method") in ("ft_cot", "step_by_step", "vanilla")
                and r.get("mean_output_tokens") is not None and r.get("k", 1) == 1]
    if len({r["method"] for r in students}) > 1:
        plots[PLOT_COST] = {r["name"]: [[r["mean_output_tokens"], r["accuracy"]]] for r in students}
    return plots


def draw(plot: str, series: dict[str, list[list[float]]]):
    """A matplotlib Figure for one plot (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if plot == PLOT_METHOD:
        labels = list(series)
        heights = [pts[0][1] * 100 for pts in series.values()]
        bars = ax.bar(range(len(labels)), heights, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title("Accuracy per method")
    elif plot == PLOT_COST:
        for label, pts in series.items():
            ax.scatter([p[0] for p in pts], [p[1] * 100 for p in pts], s=60, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("mean generated tokens per answer (inference cost)")
        ax.set_title("Accuracy vs inference cost")
        ax.legend(fontsize=8)
    else:
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=label)
        if plot == PLOT_DIVERSITY:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("D (reasoning samples per question)")
            ax.set_title("Fine-tune-CoT: accuracy vs diverse reasoning")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("student parameters")
            ax.set_title("Accuracy vs student size")
        ax.legend(fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    return fig


def write_plots(run_dir: Path, plots: dict) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for name, series in plots.items():
        fig = draw(name, series)
        fig.savefig(run_dir / name)
        plt.close(fig)
        paths.append(run_dir / name)
    return paths


# --------------------------------------------------------------------------- report + MLflow


def _markdown(run_dir: Path, rows: list[dict], pngs: list[Path]) -> str:
    parts = [f"# Fine-tune-CoT report: {run_dir}", "",
             "Accuracy as a fraction; `well_formed` = share of outputs with a readable answer (Fine-tune-CoT: the "
             "`-->` marker); `examples_per_s` includes Ray start-up and model load. Each student is the checkpoint "
             "chosen on the validation split carved out of train (`train.select`, default: validation accuracy): "
             "`selected_step` is its training step and `val_accuracy` its accuracy there; the test split is only "
             "used for this table (the paper reports the best test epoch).", "",
             results_table(rows), ""]
    parts += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(parts) + "\n"


def log_mlflow(uri: str, experiment: str, run_dir: Path, rows: list[dict], files: list[Path]) -> str:
    """One parent MLflow run (the report's files) with a nested run per evaluation (params + metrics)."""
    try:
        import mlflow
    except ImportError:
        raise RuntimeError(
            "report.mlflow_uri is set but mlflow is not installed: pip install 'ftcot-ray[mlflow]' "
            "(or unset report.mlflow_uri)"
        ) from None
    if uri.startswith("file:") or "://" not in uri:
        # mlflow >= 3.x refuses the local file store unless asked; it is the no-server default we want
        # (mlflow-skinny has no SQL backend), so opt in for this process only.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"report {run_dir.name}") as parent:
        mlflow.log_param("run_dir", str(run_dir))
        for f in files:
            mlflow.log_artifact(str(f))
        for r in rows:
            with mlflow.start_run(run_name=r["name"], nested=True):
                mlflow.log_params({k: r.get(k) for k in ("method", "diversity", "student", "params", "dataset",
                                                         "split", "k") if r.get(k) is not None})
                mlflow.log_metrics({k: float(r[k]) for k in ("accuracy", "well_formed", "mean_output_tokens",
                                                             "examples_per_s", "accuracy_at_1", "accuracy_at_k")
                                    if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])})
        return parent.info.run_id


def run_report(run_dir: str | Path, cfg: Optional[Config] = None) -> dict:
    """Write report.md, results.json and the PNGs for a run folder; returns rows, table and paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputMissing(f"run folder {run_dir} does not exist")
    split = cfg.eval.split if cfg else None
    rows = collect_rows(run_dir, split)
    if not rows:
        raise InputMissing(f"{run_dir}: no finished evaluations (eval/*/metrics.json) or teacher rows (curate/*)")
    plot_rows = [r for r in rows if r.get("split") == (split or "test")] or rows
    plots = plot_series(plot_rows)
    pngs = write_plots(run_dir, plots)
    (run_dir / "report.md").write_text(_markdown(run_dir, rows, pngs))
    write_json(run_dir / "results.json", {"rows": rows, "plots": plots})
    out = {"report_md": str(run_dir / "report.md"), "results": str(run_dir / "results.json"),
           "plots": [str(p) for p in pngs], "rows": rows, "table": results_table(rows)}
    if cfg is not None:
        from ..artifacts import remote_of

        remote = remote_of(cfg, run_dir)
        if remote is not None:  # the report beside the stages, in the run's URI
            from .. import storage

            storage.push_files(run_dir, pngs + [run_dir / "report.md", run_dir / "results.json"], remote)
            out["uri"] = remote
    if cfg and cfg.report.mlflow_uri:
        out["mlflow_run_id"] = log_mlflow(cfg.report.mlflow_uri, cfg.report.mlflow_experiment, run_dir, rows,
                                          pngs + [run_dir / "report.md", run_dir / "results.json"])
    return out
