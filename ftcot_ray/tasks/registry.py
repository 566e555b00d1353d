"""The task registry: every task module registers its tasks here when it is imported."""

from __future__ import annotations

from .base import Task

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def registered() -> dict[str, Task]:
    return dict(_REGISTRY)
