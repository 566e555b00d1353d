"""The paper's diversity study at laptop scale: Fine-tune-CoT TEST accuracy vs the number of teacher
rationales per question D (diverse reasoning), mean ± std over training seeds.

    python benchmarks/diversity_study.py                         # the study/diversity preset
    python benchmarks/diversity_study.py data.train_size=200     # any overrides of the preset

It runs `ftcot tune --config study/diversity` (a grid: D in {1, 2, 4, 8} x train.seed in {0, 1, 2},
the teacher asked once at D_max = 8; `tune.study_by=curate.diversity` evaluates every finished trial
on test), then prints the study table and each D's mean as a ratio of D=1's, the baseline measured in
the same run, with the wall time, how trials were packed and the machine's load. Whatever it
finds is the figure: the paper's gains from diversity came in the data-scarce regime, and a tiny
student's accuracy after a fixed number of steps swings by tens of points with the seed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    overrides = [a for a in argv if "=" in a]
    cmd = [sys.executable, "-m", "ftcot_ray", "tune", "--config", "study/diversity", *overrides]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    print("$", " ".join(cmd), flush=True)
    load0, t0 = os.getloadavg(), time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        return proc.returncode
    summary = next(json.loads(line) for line in reversed(proc.stdout.strip().splitlines())
                   if line.startswith("{"))  # the command's summary line (a table may follow it)
    search = Path(summary["search_dir"])
    rows = list(csv.DictReader(open(search / "study.csv")))
    base = next((float(r["mean_test_accuracy"]) for r in rows if r["curate.diversity"] == "1"), None)
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"wall {wall:.0f} s ({'reused' if summary.get('reused') else 'computed'}); "
          f"{summary['concurrent_trials']} trial(s) at once x {summary['cpus_per_trial']:g} CPUs "
          f"(Ray: {summary['cluster_cpus']:g} CPUs)")
    print("\n| D | seeds | test accuracy % (mean ± std) | per seed | ratio to D=1 |\n|---|---|---|---|---|")
    for r in rows:
        mean, std = 100 * float(r["mean_test_accuracy"]), 100 * float(r["std_test_accuracy"])
        ratio = f"{float(r['mean_test_accuracy']) / base:.3f}" if base else "-"
        seeds = ", ".join(f"{100 * float(a):.1f}" for a in json.loads(r["test_accuracies"]))
        print(f"| {r['curate.diversity']} | {r['n']} | {mean:.1f} ± {std:.1f} | {seeds} | {ratio} |")
    print(f"\nplot: {search / 'study.png'}\ntrials: {search / 'trials.md'}\nregistry: {summary['registry']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
