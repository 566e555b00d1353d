"""The offline quickstart end to end: wall time, peak memory of the whole process tree, the results table.

    python benchmarks/quickstart.py                 # the full `ftcot run` (quickstart preset)
    python benchmarks/quickstart.py train.max_steps=100 data.train_size=200   # any overrides

Targets (issue #6): under 10 minutes wall and under 8 GiB peak on a 2-core CPU machine, with
Fine-tune-CoT clearly above vanilla fine-tuning and diverse reasoning at or above D=1.
Peak memory sums the resident set of the driver and every descendant (Ray's GCS, raylet,
workers, the teacher server), sampled every 0.5 s.
"""

from __future__ import annotations

import json
import os
import platform
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


def main() -> int:
    overrides = sys.argv[1:]
    run_dir = tempfile.mkdtemp(prefix="ftcot-quickstart-")
    cmd = [sys.executable, "-m", "ftcot_ray", "run", f"run_dir={run_dir}", *overrides]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.5)
    wall = time.time() - t0
    results = os.path.join(run_dir, "results.json")
    print(f"\nmachine: {platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU")
    print(f"exit code: {proc.returncode}")
    print(f"wall: {wall:.0f} s (target < 600 s, ratio {wall / 600:.2f})")
    print(f"peak memory (process tree RSS): {peak / 2**30:.2f} GiB (target < 8 GiB, ratio {peak / 2**30 / 8:.2f})")
    if os.path.exists(results):
        print(json.dumps(json.load(open(results)), indent=1))
    print(f"run folder: {run_dir}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
