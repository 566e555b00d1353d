"""Shared pieces of the teacher tests: a tiny synthetic task for the simulated teacher, a data-stage
folder written by hand (so these tests do not depend on the data stage), /stats reads, and a
teach command line run in its own process (for kills)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import httpx

from ftcot_ray import tasks
from ftcot_ray.artifacts import finish, stage_dir
from ftcot_ray.config import Config, load_config
from ftcot_ray.tables import write_table
from ftcot_ray.tasks.base import Task

ADD_RE = re.compile(r"^What is (\d+) plus (\d+)\?$")


def _add_sim(question: str, rng: random.Random, error_rate: float) -> tuple[str, str]:
    m = ADD_RE.match(question)
    if not m:
        raise ValueError("not an addition question")
    a, b = int(m.group(1)), int(m.group(2))
    total = a + b + (rng.choice([-1, 1]) if rng.random() < error_rate else 0)
    opener = rng.choice(["We start with", "First we take", "Begin with"])
    return f"{opener} {a}. Adding {b} gives {total}.", str(total)


def _add_answer(question: str, rationale: str) -> str:
    nums = re.findall(r"-?\d+", rationale)
    if not ADD_RE.match(question) or not nums:
        raise ValueError("not an addition rationale")
    return f" {nums[-1]}."


ADD_TASK = Task(name="add_synth_test", kind="number_exact", synthetic=True, teacher_sim=_add_sim,
                teacher_answer=_add_answer, note="teacher tests only")


def register_add_task() -> Task:
    """Register the test task (after the real task modules, which `ftcot_ray.tasks` loads on import)."""
    return tasks.register(ADD_TASK)


def add_problems(n: int, test_every: int = 4) -> list[dict]:
    rng = random.Random(7)
    return [{"sample_index": i, "question": f"What is {rng.randint(1, 50)} plus {rng.randint(1, 50)}?",
             "answer": "0", "split": "test" if i % test_every == 0 else "train", "dataset": "add_synth_test"}
            for i in range(n)]


def make_cfg(tmp_path: Path, base_url: str | None = None, **overrides) -> Config:
    ov = {"run_dir": str(tmp_path / "run"), "data.dataset": "add_synth_test", "teacher.samples": 2,
          "teacher.temperature": 0.7, "teacher.concurrency": 16, "teacher.backoff_base_s": 0.01,
          "teacher.backoff_max_s": 0.05, "teacher.timeout_s": 5, "resources.num_cpus": 4, "pipeline.diversity": [1]}
    if base_url:
        ov["teacher.base_url"] = base_url
    ov.update(overrides)
    return load_config("quickstart", ov)


def write_data_stage(cfg: Config, problems: list[dict]) -> Path:
    out = stage_dir(cfg, "data")
    out.mkdir(parents=True, exist_ok=True)
    tables = {"problems": write_table(out, "problems", problems)}
    finish(out, cfg, "data", summary={"n": len(problems)}, key=out.name, tables=tables)
    return out


def sim_stats(base_url: str, full: bool = False) -> dict:
    root = base_url.rsplit("/v1", 1)[0]
    return httpx.get(f"{root}/stats" + ("?full=1" if full else ""), timeout=5).json()
