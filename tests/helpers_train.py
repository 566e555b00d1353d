"""A small synthetic curate folder (coin flips) for the student/train tests."""

from __future__ import annotations

import random
from pathlib import Path

from ftcot_ray import artifacts
from ftcot_ray.config import Config, load_config
from ftcot_ray.io import write_jsonl
from ftcot_ray.prompts import ft_cot_completion, student_prompt, vanilla_completion

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]


def coin_pairs(n: int, family: str, seed: int = 0, val_every: int = 6) -> tuple[list[dict], list[dict]]:
    """(ft_cot rows, vanilla rows): `n` coin-flip questions in the paper's student formats."""
    rng = random.Random(seed)
    cot, van = [], []
    for i in range(n):
        people = rng.sample(NAMES, 3)
        flips = [rng.random() < 0.5 for _ in people]
        q = "A coin is heads up. " + " ".join(f"{p} {'flips' if f else 'skips'} the coin." for p, f in zip(people, flips))
        q += " Is the coin still heads up?"
        steps = " ".join(f"{p} {'flips' if f else 'skips'}, {sum(flips[:k + 1])} flips." for k, (p, f) in enumerate(zip(people, flips)))
        answer = "no" if sum(flips) % 2 else "yes"
        split = "val" if i % val_every == val_every - 1 else "train"
        base = {"sample_index": i, "sample_idx": 0, "split": split, "prompt": student_prompt(q, family)}
        cot.append(base | {"completion": ft_cot_completion(steps, answer, family)})
        van.append(base | {"completion": vanilla_completion(answer, family)})
    return cot, van


def tiny_config(tmp: Path, arch: str = "gpt2", **overrides) -> Config:
    raw = {
        "run_dir": str(tmp / "run"), "student.arch": arch, "student.size": "tiny", "student.vocab_size": 400,
        "train.lr": 3e-3, "train.batch_size": 8, "train.max_steps": 30, "train.num_workers": 2,
        "train.warmup_ratio": 0.1, "train.max_length": 128, "train.log_every": 1, "train.eval_every_steps": 5,
        "train.val_max_new_tokens": 48,
    }
    return load_config("quickstart", raw | overrides)


def coin_problems(pairs: list[dict]) -> list[dict]:
    """The problems table matching coin_pairs (val questions are what validation accuracy is measured on)."""
    from ftcot_ray.prompts import PROMPT_SEP

    out = []
    for p in pairs:
        q = p["prompt"].removesuffix(PROMPT_SEP)
        answer = p["completion"].rsplit("-->", 1)[-1].strip()
        out.append({"sample_index": p["sample_index"], "question": q, "answer": answer, "split": p["split"],
                    "dataset": "coin_flip_synth"})
    return out


def make_curate_folder(cfg: Config, n: int = 48, out: Path | None = None) -> Path:
    out = out or artifacts.stage_dir(cfg, "curate")
    cot, van = coin_pairs(n, cfg.student.family)
    write_jsonl(out / "ft_cot_pairs.jsonl", cot)
    write_jsonl(out / "vanilla_pairs.jsonl", van)
    write_jsonl(out / "problems.jsonl", coin_problems(cot))
    artifacts.finish(out, cfg, "curate")
    return out


LOAD_AND_GENERATE = r'''
import json, sys
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
path, family, prompt = sys.argv[1:4]
cls = AutoModelForSeq2SeqLM if family == "encoder-decoder" else AutoModelForCausalLM
model = cls.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**enc, max_new_tokens=12, do_sample=False)
new = out[0] if family == "encoder-decoder" else out[0][enc["input_ids"].shape[1]:]
print(json.dumps({"new_tokens": len(new), "text": tok.decode(new, skip_special_tokens=True),
                  "params": sum(p.numel() for p in model.parameters()),
                  "ray_or_deepspeed_imported": sorted(m for m in ("ray", "deepspeed") if m in sys.modules)}))
'''


def load_and_generate(folder: Path, family: str, prompt: str) -> dict:
    """Load an exported student in a fresh interpreter that imports neither Ray nor DeepSpeed."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(folder), family, prompt],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
