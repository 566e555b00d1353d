"""Tasks by name: the 12 paper benchmarks, synthetic generators, and users' own files.

    from ftcot_ray.tasks import get_task
    task = get_task("gsm8k")
    task.extract_answer(text, marker="-->"); task.is_correct(pred, gold)
"""

from __future__ import annotations

from . import paper, synthetic  # noqa: F401  (each registers its tasks)
from .base import Task
from .registry import register, registered


def task_names() -> list[str]:
    return sorted(registered())


def get_task(name: str) -> Task:
    tasks = registered()
    if name not in tasks:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(tasks))}")
    return tasks[name]


def synthetic_tasks() -> list[Task]:
    """Registered tasks the simulated teacher can answer (they carry a `teacher_sim`)."""
    return [t for _, t in sorted(registered().items()) if t.teacher_sim is not None]


__all__ = ["Task", "get_task", "register", "task_names", "synthetic_tasks"]
