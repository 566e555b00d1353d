"""The offline quickstart end to end: wall time, peak memory, output lines, and the results table —
per training seed and as mean ± std over seeds.

    python benchmarks/quickstart.py                   # one `ftcot run` of the quickstart preset
    python benchmarks/quickstart.py --seeds 3         # train.seed = 0, 1, 2 (data and teacher shared)
    python benchmarks/quickstart.py --seeds 3 train.max_steps=300   # any overrides
    python benchmarks/quickstart.py --seeds 3 'pipeline.methods=[ft_cot,step_by_step,vanilla]' 'pipeline.diversity=[1]'
        # Fine-tune-CoT vs distilling step-by-step vs vanilla on the same curated data: accuracy and
        # what an answer costs at inference (generated tokens, examples/s), per seed and mean ± std

Targets (issues 6 and 9): each run under 10 minutes and under 8 GiB on a 2-core CPU machine, under
100 lines of output, and Fine-tune-CoT far above vanilla fine-tuning for EVERY seed (a tiny
student's accuracy after a fixed number of steps swings with the seed: one seed proves nothing).
Peak memory sums the resident set of the driver and every descendant (Ray's GCS, raylet, workers,
the teacher server), sampled every 0.5 s. Seed s > 0 re-uses the seed-0 run's data, teacher and
curate stages (train.seed only re-keys train and eval), so its wall time is training + evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def one_run(run_dir: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ftcot_ray", "run", f"run_dir={run_dir}", *overrides]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    # Bytes, not text: text mode would turn each progress bar's carriage returns into new lines.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps, peak, out = psutil.Process(proc.pid), 0, []
    import threading

    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.5)
    reader.join(5)
    text = b"".join(out).decode("utf-8", "replace")
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "peak_gib": peak / 2**30,
            "lines": text.count("\n"), "output": text}  # lines as a terminal shows them


def rows_of(run_dir: str, seed: int) -> dict[str, dict]:
    """{row name: row} for the rows trained with this seed (the teacher row is shared)."""
    rows = json.load(open(os.path.join(run_dir, "results.json")))["rows"]
    out = {}
    for r in rows:
        if r.get("method") == "teacher":
            out[r["name"]] = r
            continue
        cfg_path = os.path.join(r["path"], "config.yaml")
        import yaml

        if (yaml.safe_load(open(cfg_path)).get("train") or {}).get("seed") == seed:
            out[r["name"]] = r
    return out


def mean_of(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return fmt.format(statistics.mean(values)) if values else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="train.seed = 0..N-1")
    args, overrides = p.parse_known_args()
    run_dir = tempfile.mkdtemp(prefix="ftcot-quickstart-")
    runs, tables = [], []
    for seed in range(args.seeds):
        r = one_run(run_dir, [*overrides, f"train.seed={seed}"])
        if r["rc"] != 0:
            print(r["output"][-4000:])
            return r["rc"]
        runs.append(r)
        tables.append(rows_of(run_dir, seed))
        print(f"seed {seed}: wall {r['wall_s']:.0f} s, peak {r['peak_gib']:.2f} GiB, {r['lines']} lines of output")
        for name, row in tables[-1].items():  # as each seed ends: a run cut short keeps what it measured
            print(f"  {name}: accuracy {row['accuracy'] * 100:.1f}, selected step {row.get('selected_step') or '-'}, "
                  f"output tokens {row.get('mean_output_tokens') or '-'}", flush=True)

    print(f"\nmachine: {platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"no GPU; load average at the end {os.getloadavg()[0]:.1f}")
    names = list(tables[0])
    head = ("| method | " + " | ".join(f"seed {s}" for s in range(args.seeds))
            + " | mean ± std | selected steps | output tokens | examples/s |")
    print(head + "\n|" + "---|" * (args.seeds + 5))
    for name in names:
        rows = [t[name] for t in tables if name in t]
        accs = [r["accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        steps = ", ".join(str(r["selected_step"]) for r in rows if r.get("selected_step")) or "-"
        toks = mean_of(rows, "mean_output_tokens", "{:.1f}")
        speed = mean_of(rows, "examples_per_s_generation", "{:.0f}")
        print(f"| {name} | " + " | ".join(f"{a * 100:.1f}" for a in accs)
              + f" | {statistics.mean(accs) * 100:.1f} ± {std * 100:.1f} | {steps} | {toks} | {speed} |")
    first = runs[0]
    print(f"\nfirst run (data + teacher + 3 trainings): wall {first['wall_s']:.0f} s (target < 600 s, ratio "
          f"{first['wall_s'] / 600:.2f}); peak {first['peak_gib']:.2f} GiB (target < 8, ratio {first['peak_gib'] / 8:.2f}); "
          f"{first['lines']} lines of output (target < 100)")
    if len(runs) > 1:
        rest = [r["wall_s"] for r in runs[1:]]
        print(f"seeds 1..{args.seeds - 1} (train + eval only): wall {statistics.mean(rest):.0f} s each")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
