"""Eval throughput: our batched Ray Data evaluation vs per-example `model.generate` (the reference shape).

Same tiny student (a from-scratch GPT-2, 4 layers x 128, BPE trained here), same prompts, same run;
greedy outputs are checked equal. Ours is timed twice: wall time including Ray start-up, actor
start and model load, and the generation time inside the replica (steady state).

    python benchmarks/eval_throughput.py [--prompts 300] [--max-new-tokens 48] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both paths")
    args = ap.parse_args()

    import torch

    from ftcot_ray.config import load_config
    from ftcot_ray.prompts import student_prompt
    from ftcot_ray.stages.evaluate import evaluate_to
    from ftcot_ray.tables import read_table, write_table
    from ftcot_ray.student.generate import generate_one, load_student

    tmp = Path(tempfile.mkdtemp(prefix="ftcot_eval_bench_"))
    # ~1M parameters; the EOS boost makes outputs stop at varied lengths, like a trained student's.
    from ftcot_ray.config import DataConfig
    from ftcot_ray.student.export import export_untrained
    from ftcot_ray.tasks.synthetic import load_coin_flip

    # Coin flips with 2 to 8 people: prompts of varied length, so batches really pad.
    per = -(-args.prompts // 7)
    questions = [q for d in range(2, 9) for q in load_coin_flip(None, DataConfig(difficulty=d, train_size=per,
                                                                                  test_size=0, seed=11))]
    questions = [q | {"sample_index": i} for i, q in enumerate(questions[:args.prompts])]
    # Random weights, exported exactly as training exports a student; the EOS boost makes outputs end
    # at varied lengths, as a trained student's do.
    folder = export_untrained(tmp / "student", [q["question"] for q in questions] * 2, eos_boost=1.5, weight_scale=20.0)
    problems = [q | {"split": "test"} for q in questions]
    cfg = load_config(None, [
        f"run_dir={tmp / 'run'}", "data.dataset=coin_flip", f"eval.batch_size={args.batch_size}",
        f"eval.max_new_tokens={args.max_new_tokens}", f"eval.num_replicas={args.replicas}",
        f"eval.cpus_per_replica={max(1, args.threads // args.replicas)}",
        f"eval.torch_threads={max(1, args.threads // args.replicas)}", f"resources.num_cpus={args.threads}",
    ])

    load_start = os.getloadavg()[0]
    # Reference: one prompt at a time, as the original repo's evaluation loop does.
    torch.set_num_threads(args.threads)
    student = load_student(folder)
    print(f"student: {student.model_type}, {student.n_params:,} params; {len(problems)} prompts; "
          f"max_new_tokens {args.max_new_tokens}; torch threads {args.threads}", flush=True)
    t0 = time.perf_counter()
    ref = [generate_one(student, student_prompt(p["question"], "decoder"), max_new_tokens=args.max_new_tokens)
           for p in problems]
    ref_s = time.perf_counter() - t0

    # Ours: the eval stage's pipeline (Ray Data actor pool, batched, left-padded, predictions written as
    # shards); Ray is started inside the timed region.
    write_table(tmp, "problems", [p | {"dataset": "coin_flip"} for p in problems])
    t0 = time.perf_counter()
    _, metrics = evaluate_to(cfg, tmp / "problems.jsonl", "ft_cot", folder, tmp / "eval")
    ours_s = time.perf_counter() - t0
    preds = read_table(tmp / "eval", "predictions")

    by_index = {p["sample_index"]: p for p in preds}
    mismatches = sum(by_index[p["sample_index"]]["output"] != r.text for p, r in zip(problems, ref))
    n = len(problems)
    ref_eps = n / ref_s
    ours_eps = n / ours_s
    steady = metrics.get("examples_per_s_generation")
    cores = f"CPU, {os.cpu_count()} cores"
    print(f"\n{cores}; load average during the run {load_start:.1f} -> {os.getloadavg()[0]:.1f} "
          f"(other jobs on the machine slow both paths; the ratio is measured in one run)")
    print(f"{'path':<48} {'examples/s':>11} {'vs reference':>13}")
    print(f"{'reference: per-example model.generate':<48} {ref_eps:>11.1f} {1.0:>12.2f}x")
    print(f"{'ours: Ray Data batched (wall, incl. Ray start-up)':<48} {ours_eps:>11.1f} {ours_eps / ref_eps:>12.2f}x")
    if steady:
        print(f"{'ours: Ray Data batched (generation, steady)':<48} {steady:>11.1f} {steady / ref_eps:>12.2f}x")
    print(f"outputs equal: {n - mismatches}/{n}; mean output tokens {metrics['mean_output_tokens']:.1f}; "
          f"batch {args.batch_size}, replicas {args.replicas}")
    if mismatches:
        sys.exit(f"FAIL: {mismatches} outputs differ from the per-example reference")


if __name__ == "__main__":
    main()
