"""teacher-sim's counters, served at ``/stats``: what a test asserts about the traffic it got.

Requests per route, faults, each completion request's arrival time and User-Agent (`?full=1`: a
test checks rate limits in every window and who was sending when), and answers per (prompt,
sample): an answer is counted only when it was delivered to a still-connected client (or written into a batch's output file), so a test can
assert that no prompt was answered twice. Batch API: files uploaded, batches created, and how
often each line (``custom_id``) was submitted, so a test can assert that no line was paid twice.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


class SimStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter = Counter()  # by route
        self.faults: Counter = Counter()
        self.answers: Counter = Counter()  # "prompt digest#sample" -> delivered answers
        self.previews: dict[str, str] = {}
        self.abandoned = 0  # answers not delivered: the client had gone (killed or timed out)
        self.in_flight = 0
        self.last_answer_at = 0.0
        self.last_request_at = 0.0
        self.files_uploaded = 0
        self.batches_created = 0
        self.batch_lines: Counter = Counter()  # custom_id -> times submitted in a batch
        self.log: list[tuple[float, str]] = []  # (arrival time, User-Agent) of each completion request
        self.completion_requests = 0
        self.started = time.time()

    def log_request(self, user_agent: str) -> None:
        self.completion_requests += 1
        self.log.append((time.time(), user_agent))

    def answered(self, keys: list[str], prompt: Any) -> None:
        for k in keys:
            self.answers[k] += 1
        if keys:
            digest = keys[0].rsplit("#", 1)[0]
            self.previews.setdefault(digest, (prompt if isinstance(prompt, str) else str(prompt))[:120])
        self.last_answer_at = time.time()

    def to_json(self, full: bool, batches: dict | None = None) -> dict:
        dup = {k: c for k, c in self.answers.items() if c > 1}
        now = time.time()
        out = {
            "total_requests": sum(self.requests.values()),
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "answered": sum(self.answers.values()),
            "answered_keys": len(self.answers),
            "max_answers_per_prompt_sample": max(self.answers.values(), default=0),
            "duplicates": [{"key": k, "count": c, "prompt": self.previews.get(k.rsplit("#", 1)[0], "")}
                           for k, c in dup.items()],
            "abandoned": self.abandoned,
            "in_flight": self.in_flight,
            "seconds_since_last_answer": (now - self.last_answer_at) if self.last_answer_at else None,
            "seconds_since_last_request": (now - self.last_request_at) if self.last_request_at else None,
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batch_lines_submitted": sum(self.batch_lines.values()),
            "max_submissions_per_batch_line": max(self.batch_lines.values(), default=0),
            "batches": batches or {},
        }
        if full:
            out["answers"] = dict(self.answers)
            out["request_log"] = [[t, ua] for t, ua in self.log]
        return out
