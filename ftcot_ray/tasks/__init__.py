"""Tasks by name: the 12 paper benchmarks, synthetic generators, and users' own files.

    from ftcot_ray.tasks import get_task
    task = get_task("gsm8k")
    task.extract_answer(text, marker="-->"); task.is_correct(pred, gold)
"""

from __future__ import annotations

from .base import Task

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def _load_all() -> None:
    # Python caches imports, so this is free after the first call; each module registers its tasks.
    from . import paper, synthetic  # noqa: F401


def task_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


__all__ = ["Task", "get_task", "register", "task_names"]
