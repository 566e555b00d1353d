"""The student replica: one exported student, dynamic batching, token streaming.

Every request is a `Job` of rows (its n choices) with token ids the ingress already built with
the student's card. The batcher (batcher.py) takes the jobs that queued while the previous batch
ran, up to `max_batch_size` rows (a request's n choices always decode together), and the batch
runs as one decoding loop (engine.py). The batch method is an async generator: after every
forward pass it yields one update per job (the new text of its streamed rows, or its final texts),
so streamed and non-streamed requests share batches, and a streamed request's pieces add up to what
the same request returns whole.

`complete()` and `stream()` are what the ingress calls (through a DeploymentHandle); `stats()`
reports how full the batches were (the tests check that batching happened).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from ray import serve

from .batcher import Batcher
from .engine import RowSpec, abort, new_states, step_states

log = logging.getLogger("ray.serve")


@dataclass
class Job:
    rows: list[RowSpec]
    stream: bool = False
    aborted: bool = False  # set in the replica when the caller went away: its rows leave the batch


@serve.deployment
class StudentServer:
    def __init__(self, model_id: str, folder: str, max_batch_size: int, batch_wait_timeout_s: float,
                 torch_threads: int, use_gpu: bool):
        from ..student.generate import load_student

        self.model_id = model_id
        self.student = load_student(folder, torch_threads=torch_threads)
        if use_gpu:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"{model_id}: serve.gpus_per_replica > 0 but this replica sees no CUDA device")
            self.student.model.to("cuda")
        self.batcher = Batcher(self._run_batch, max_batch_size, batch_wait_timeout_s, rows_of=lambda j: len(j.rows))
        self.counts = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "max_batch_requests": 0}
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny decode at start-up, so the first request does not pay torch's first-call costs."""
        from .engine import run_rows

        ids = self.student.tokenizer("warm up", add_special_tokens=True)["input_ids"] or [0]
        run_rows(self.student, [RowSpec(list(ids), 2)])

    async def complete(self, job: Job) -> list[dict]:
        """The finished rows of one request: [{"index", "text", "finish_reason", "tokens"}]."""
        try:
            async for update in self.batcher.submit(job):
                if update and update[0].get("final"):
                    return update
        finally:
            job.aborted = True  # no-op once finished; else (cancelled) its rows stop decoding
        raise RuntimeError("the batch ended without finishing this request")  # a bug, not a user error

    async def stream(self, job: Job) -> AsyncIterator[list[dict]]:
        """Per forward pass, the rows of this request that have new text or just finished."""
        remaining = len(job.rows)
        try:
            async for update in self.batcher.submit(job):
                if not update:
                    continue
                yield update
                remaining -= sum(1 for u in update if u["finish_reason"] is not None)
                if remaining <= 0:
                    return
        finally:
            job.aborted = True

    def stats(self) -> dict:
        return dict(self.counts)

    async def _run_batch(self, jobs: list[Job]):
        from .reasoning import TextStream

        tok = self.student.tokenizer
        states = [new_states(j.rows) for j in jobs]
        flat = [s for group in states for s in group]
        offsets = [0]
        for group in states:
            offsets.append(offsets[-1] + len(group))
        self._count(jobs, len(flat))
        texts = [[TextStream(tok) for _ in j.rows] if j.stream else None for j in jobs]
        done = [False] * len(jobs)
        steps = step_states(self.student, flat)
        try:
            while True:
                for j, job in enumerate(jobs):
                    if job.aborted and not done[j]:
                        abort(states[j])
                # The forward pass runs in a worker thread: the replica keeps taking requests meanwhile.
                step = await asyncio.to_thread(next, steps, None)
                if step is None:
                    break
                out = []
                for j, job in enumerate(jobs):
                    if done[j]:
                        out.append(StopAsyncIteration)
                        continue
                    done[j] = all(s.done for s in states[j])
                    if job.stream:
                        out.append(_stream_update(states[j], texts[j], step[offsets[j]:offsets[j + 1]]))
                    elif done[j]:
                        out.append([_final(k, s, tok) for k, s in enumerate(states[j])])
                    else:
                        out.append(None)
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            for group in states:
                abort(group)
            raise

    def _count(self, jobs: list[Job], rows: int) -> None:
        c = self.counts
        c["requests"] += len(jobs)
        c["batches"] += 1
        c["rows"] += rows
        c["max_batch_rows"] = max(c["max_batch_rows"], rows)
        c["max_batch_requests"] = max(c["max_batch_requests"], len(jobs))


def _stream_update(rows, streams, step) -> Optional[list[dict]]:
    """The new text of a streamed job's rows that produced a token in this step (None: nothing new)."""
    update = []
    for k, s in enumerate(rows):
        if step[k] is None:
            continue
        final = s.done
        piece = streams[k].delta(s.ids, final=final)
        if piece or final:
            update.append({"index": k, "text": piece, "finish_reason": s.finish_reason if final else None,
                           "tokens": len(s.ids)})
    return update or None


def _final(k: int, s, tok) -> dict:
    return {"index": k, "text": tok.decode(s.ids, skip_special_tokens=True), "finish_reason": s.finish_reason,
            "tokens": len(s.ids), "final": True}
