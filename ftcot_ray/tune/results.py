"""What a search leaves: the trials table (CSV + markdown), plots of validation accuracy vs D and vs
learning rate, the best trial, and the diversity study's mean +- std test accuracy per value.

Plain functions on rows (one dict per trial); `trial_rows` reads Tune's experiment folder through
its public ExperimentAnalysis.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Optional

from ..config import Config, with_overrides
from .trial import read_attempts, trial_config_path

FIGURES = ("val_accuracy", "val_loss", "selected_step", "steps", "wall_s", "attempts")


def trial_rows(cfg: Config, experiment: Path, search_dir: Path, keys: list[str]) -> list[dict]:
    """One row per trial of the experiment: its params, D and lr in effect, status and figures."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    attempts = Counter(a["trial_id"] for a in read_attempts(search_dir))
    rows = []
    for t in sorted(analysis.trials, key=lambda t: t.trial_id):
        r = t.last_result or {}
        done = t.status == "TERMINATED" and bool(r.get("trial_done"))
        status = ("finished" if done else "stopped early (asha)" if t.status == "TERMINATED"
                  else "failed" if t.status == "ERROR" else t.status.lower())
        c = with_overrides(cfg, {k: t.config[k] for k in keys if k in t.config})
        df = analysis.trial_dataframes.get(t.trial_id)
        acc = r.get("val_accuracy") if done else _best_seen(df, "val_accuracy", max)
        loss = r.get("val_loss") if done else _best_seen(df, "val_loss", min)
        rows.append({"trial_id": t.trial_id, **{k: t.config.get(k) for k in keys},
                     "D": c.curate.diversity, "lr": c.train.lr, "status": status,
                     "val_accuracy": acc, "val_loss": loss, "selected_step": r.get("selected_step") if done else None,
                     "steps": r.get("step"), "wall_s": round(r.get("trial_wall_s") or r.get("time_total_s") or 0.0, 1),
                     "attempts": attempts.get(t.trial_id, 0), "train_dir": r.get("train_dir"),
                     "config": str(trial_config_path(search_dir, t.trial_id))})
    return rows


def _best_seen(df, column: str, pick) -> Optional[float]:
    if df is None or column not in df:
        return None
    values = [float(v) for v in df[column] if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return pick(values) if values else None


def best(rows: list[dict], metric: str) -> Optional[dict]:
    """The finished trial best by `metric` (accuracy ties go to the lower val loss, then the first trial)."""
    done = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
    if not done:
        return None
    sign = 1 if metric == "val_loss" else -1
    return min(done, key=lambda r: (sign * r[metric], r.get("val_loss") if r.get("val_loss") is not None
                                    else math.inf, r["trial_id"]))


def write_tables(folder: Path, rows: list[dict], keys: list[str]) -> list[Path]:
    test = ["test_accuracy"] if any(r.get("test_accuracy") is not None for r in rows) else []  # the study only
    columns = ["trial_id", *keys, *(c for c in ("D", "lr") if c not in keys), "status", *FIGURES, *test, "config"]
    csv_path = folder / "trials.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md_path = folder / "trials.md"
    md_path.write_text(markdown(rows, [c for c in columns if c != "config"]) + "\n", encoding="utf-8")
    return [csv_path, md_path]


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot(folder: Path, rows: list[dict]) -> list[Path]:
    """val_accuracy_vs_D.png and val_accuracy_vs_lr.png (each trial one point; colour: the other one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("val_accuracy") is not None]
    out = []
    for x, other, log in (("D", "lr", False), ("lr", "D", True)):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for value in sorted({r[other] for r in pts}):
            sel = [r for r in pts if r[other] == value]
            ax.scatter([r[x] for r in sel], [r["val_accuracy"] for r in sel], label=f"{other}={_cell(value)}")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("diversity D (rationales per question)" if x == "D" else "learning rate")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"ftcot tune: validation accuracy vs {x}")
        if pts:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"val_accuracy_vs_{x}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def study_table(rows: list[dict], key: str) -> list[dict]:
    """Mean +- sample std of the trials' TEST accuracy per value of `key` (finished trials only)."""
    groups: dict = {}
    for r in rows:
        if r["status"] == "finished" and r.get("test_accuracy") is not None:
            groups.setdefault(r[key], []).append(r["test_accuracy"])
    out = []
    for value in sorted(groups, key=lambda v: (isinstance(v, str), v)):
        accs = groups[value]
        out.append({key: value, "n": len(accs), "mean_test_accuracy": statistics.fmean(accs),
                    "std_test_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "test_accuracies": [round(a, 4) for a in accs]})
    return out


def write_study(folder: Path, table: list[dict], key: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = folder / "study.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[key, "n", "mean_test_accuracy", "std_test_accuracy", "test_accuracies"])
        w.writeheader()
        w.writerows(table)
    md = ["| " + key + " | n | test accuracy (mean ± std) | per seed |", "|---|---|---|---|"]
    md += [f"| {t[key]} | {t['n']} | {100 * t['mean_test_accuracy']:.1f} ± {100 * t['std_test_accuracy']:.1f} | "
           f"{', '.join(f'{100 * a:.1f}' for a in t['test_accuracies'])} |" for t in table]
    md_path = folder / "study.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [str(t[key]) for t in table]
    ax.errorbar(xs, [100 * t["mean_test_accuracy"] for t in table], yerr=[100 * t["std_test_accuracy"] for t in table],
                fmt="o-", capsize=5)
    ax.set_xlabel(key)
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png = folder / "study.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [csv_path, md_path, png]
