"""Training throughput: our Ray Train + DeepSpeed path vs a single-process Hugging Face Trainer,
same tiny model, same data, same micro-batch and step count, measured in one run; plus ZeRO-3's
per-rank parameter memory vs a replicated (ZeRO-0/1/2) copy.

    python benchmarks/train_throughput.py                       # CPU: 2 workers, tiny GPT-2
    python benchmarks/train_throughput.py --model-size small --bf16 --use-gpu --num-workers 4

tokens/s counts real (non-pad) tokens of the training steps only (no evaluation or checkpoints,
on both sides). On CPU both sides use the same cores: 2 Ray workers with 1 CPU (1 torch thread)
each vs one process with 1 thread and with torch's default thread count (the ratio is to the faster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ftcot_ray" / "torch_extensions"))

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]


def coin_pairs(n: int, seed: int = 0) -> list[dict]:
    from ftcot_ray.prompts import ft_cot_completion, student_prompt

    rng, rows = random.Random(seed), []
    for i in range(n):
        people = rng.sample(NAMES, 4)
        flips = [rng.random() < 0.5 for _ in people]
        q = "A coin is heads up. " + " ".join(f"{p} {'flips' if f else 'skips'} the coin." for p, f in zip(people, flips))
        steps = " ".join(f"{p} {'flips' if f else 'skips'}, {sum(flips[:k + 1])} flips." for k, (p, f) in enumerate(zip(people, flips)))
        rows.append({"sample_index": i, "sample_idx": 0, "split": "val" if i % 10 == 9 else "train",
                     "prompt": student_prompt(q + " Is the coin still heads up?", "decoder"),
                     "completion": ft_cot_completion(steps, "no" if sum(flips) % 2 else "yes", "decoder")})
    return rows


def make_config(tmp: Path, args, zero_stage: int):
    from ftcot_ray.config import load_config

    return load_config("quickstart", {
        "run_dir": str(tmp / f"run-z{zero_stage}"), "student.arch": args.arch, "student.size": args.model_size,
        # --batch-size is the micro-batch per worker (the HF baseline's per-device batch); the global batch follows.
        "train.batch_size": args.batch_size * args.num_workers, "train.micro_batch_size": args.batch_size,
        "train.max_steps": args.steps, "train.num_workers": args.num_workers,
        "train.use_gpu": args.use_gpu, "train.zero_stage": zero_stage, "train.precision": "bf16" if args.bf16 else "fp32",
        # One validation, at the end, and none of its generation inside the timed steps (tokens/s counts steps only).
        "train.select": "last", "train.eval_every_steps": args.steps, "train.val_max_examples": 8,
        "train.val_max_new_tokens": 8, "train.max_length": 256,
    })


def ours(tmp: Path, args, zero_stage: int) -> dict:
    from ftcot_ray import artifacts
    from ftcot_ray.io import write_jsonl
    from ftcot_ray.stages import train

    cfg = make_config(tmp, args, zero_stage)
    cur = artifacts.stage_dir(cfg, "curate")
    rows = coin_pairs(args.pairs)
    write_jsonl(cur / "ft_cot_pairs.jsonl", rows)
    write_jsonl(cur / "vanilla_pairs.jsonl", rows)
    write_jsonl(cur / "problems.jsonl", [{"sample_index": r["sample_index"], "question": r["prompt"], "answer": "yes",
                                          "split": r["split"], "dataset": "coin_flip_synth"} for r in rows])
    artifacts.finish(cur, cfg, "curate")
    train.run(cfg)
    return json.loads((artifacts.stage_dir(cfg, "train") / "metrics.json").read_text())


def hf_trainer(tmp: Path, args) -> dict:
    """The baseline: transformers.Trainer in this process, one device, same model/data/micro-batch/steps."""
    import torch
    from transformers import Trainer, TrainingArguments

    from ftcot_ray.student.data import batch_tokens, collate, encode_pairs
    from ftcot_ray.student.model import build_model
    from ftcot_ray.student.tokenizer import pair_texts, train_tokenizer

    cfg = make_config(tmp, args, 0)
    rows = coin_pairs(args.pairs)
    tok = train_tokenizer(pair_texts(rows + rows), cfg.student.vocab_size)  # as the stage does (both pair files)
    train_enc = encode_pairs([r for r in rows if r["split"] == "train"], tok, "decoder", cfg.train.max_length)
    torch.manual_seed(0)
    model = build_model(cfg.student, tok, cfg.train.max_length)
    counted = {"tokens": 0}

    def count_collate(batch):
        b = collate(batch, tok.pad_token_id, "decoder")
        counted["tokens"] += batch_tokens(b, "decoder")
        return b

    targs = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=cfg.train.lr, lr_scheduler_type="cosine", warmup_steps=int(cfg.train.warmup_ratio * args.steps),
        use_cpu=not args.use_gpu, bf16=args.bf16, save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_enc.examples, data_collator=count_collate)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {"tokens": counted["tokens"], "tokens_per_s": counted["tokens"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--pairs", type=int, default=400)
    args = p.parse_args()

    import ray
    import torch

    ray.init(num_cpus=max(4, args.num_workers + 1), include_dashboard=False, log_to_driver=False)
    device = (torch.cuda.get_device_name(0) if args.use_gpu else f"CPU, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="ftcot-bench-") as tmp:
        tmp = Path(tmp)
        z2 = ours(tmp, args, 2)
        z3 = ours(tmp, args, 3)
        # Tiny models on a few busy cores thrash with several intra-op threads: measure the baseline
        # with 1 thread and with torch's default, and compare against the faster of the two.
        default_threads = torch.get_num_threads()
        hf_runs = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            hf_runs[threads] = hf_trainer(tmp, args)
        torch.set_num_threads(default_threads)
    ray.shutdown()
    best = max(hf_runs, key=lambda k: hf_runs[k]["tokens_per_s"])
    hf = hf_runs[best]

    dtype_bytes = 2 if args.bf16 else 4
    print(f"\ntrain throughput — {device}; {args.arch} {args.model_size} ({z2['params']:,} params), "
          f"{'bf16' if args.bf16 else 'fp32'}, micro-batch {args.batch_size}, {args.steps} steps")
    print(f"{'path':58} {'tokens/s':>10} {'ratio to best HF':>17}")
    rows = [(f"ours: Ray Train + DeepSpeed ZeRO-2, {args.num_workers} workers", z2["tokens_per_s"]),
            (f"ours: Ray Train + DeepSpeed ZeRO-3, {args.num_workers} workers", z3["tokens_per_s"]),
            *[(f"baseline: HF Trainer, single process, {k} torch thread(s)", r["tokens_per_s"]) for k, r in hf_runs.items()]]
    for name, tps in rows:
        print(f"{name:58} {tps:10.0f} {tps / hf['tokens_per_s']:16.2f}x")
    full, part = z3["params"], z3["params_per_rank"]
    print(f"\nZeRO-3 parameter memory per rank ({args.num_workers} ranks, {dtype_bytes}-byte params)")
    print(f"{'replicated (ZeRO-0/1/2)':30} {full:>12,} params {full * dtype_bytes / 2**20:8.2f} MiB")
    print(f"{'ZeRO-3 partition':30} {part:>12,} params {part * dtype_bytes / 2**20:8.2f} MiB   "
          f"ratio {part / full:.2f}")


if __name__ == "__main__":
    main()
