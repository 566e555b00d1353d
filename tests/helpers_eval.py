"""Tiny students for the eval tests: random-weights GPT-2 / T5 exported by the package's own export
path (`ftcot_ray.student.export.export_untrained`), so the folder IS what training exports."""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou"]


def coin_questions(n: int, seed: int = 0, min_people: int = 1, max_people: int = 6) -> list[dict]:
    """Coin-flip-like questions of varied length (so batches really need padding)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        heads = True
        steps = []
        for name in rng.sample(NAMES, rng.randint(min_people, max_people)):
            if rng.random() < 0.5:
                steps.append(f"{name} flips the coin.")
                heads = not heads
            else:
                steps.append(f"{name} does not flip the coin.")
        q = "A coin is heads up. " + " ".join(steps) + " Is the coin still heads up?"
        out.append({"sample_index": i, "question": q, "answer": "yes" if heads else "no"})
    return out


def corpus() -> list[str]:
    texts = [q["question"] for q in coin_questions(300, seed=123)]
    texts += ["yes no --> The answer is Therefore, the answer is Q: A: Let's think step by step. ###"] * 5
    return texts


def build_student(folder: Path, family: str = "decoder", seed: int = 0, eos_boost: float = 1.0,
                  size: str = "tiny", init_scale: float = 1.0, method: str = "ft_cot") -> Path:
    """A random-weights student exported by the package's own path (the shape training exports).
    `init_scale` > 1 gives varied garbage; `eos_boost` > 1 makes some rows stop early (exercises padding
    after EOS in batched generation)."""
    from ftcot_ray.student.export import export_untrained

    return export_untrained(folder, corpus(), arch="gpt2" if family == "decoder" else "t5", size=size, seed=seed,
                            vocab_size=400, weight_scale=init_scale, eos_boost=eos_boost, method=method)
