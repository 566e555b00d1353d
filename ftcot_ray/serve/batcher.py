"""Dynamic batching, with the batch formed when the decoding loop is free to run it.

Requests (`Job`s of rows) queue here; one loop task takes everything that queued (up to `max_rows`
rows, oldest first) as the next batch, runs it to the end, and hands each job its updates through
its own queue. When the loop was idle, it first waits `wait_s` so that a burst arriving together
shares the first batch; under load it never waits, the queue filled while the previous batch ran.

Why not Ray Serve's `@serve.batch`: its queue (Ray 2.60) forms a batch as soon as requests arrive
and `batch_wait_timeout_s` passes, also while the previous batch is still decoding, and the batches
formed meanwhile then wait their turn one after another. A decode lasts many wait timeouts, so
under load its batches stay small: with 32 closed-loop clients on one tiny student
(benchmarks/serve_load.py, 2 cores) it averaged 1.6 rows per batch and 1.3x the unbatched
throughput. Forming the batch at run time is what lets the rows that waited share forward passes.

Plain asyncio, no Ray: unit-tested alone (tests/test_serve_units.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, AsyncIterator, Callable

log = logging.getLogger("ray.serve")

_END = object()  # a job's queue: no more updates


class Batcher:
    """`run_batch(jobs)` is an async generator yielding, per step, one item per job: an update to pass
    on, None (nothing new), or StopAsyncIteration (that job is finished)."""

    def __init__(self, run_batch: Callable[[list], AsyncIterator[list]], max_rows: int, wait_s: float,
                 rows_of: Callable[[Any], int] = lambda job: 1):
        self.run_batch, self.max_rows, self.wait_s, self.rows_of = run_batch, max_rows, wait_s, rows_of
        self.pending: deque[tuple[Any, asyncio.Queue]] = deque()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def submit(self, job) -> AsyncIterator[Any]:
        """The updates for `job`, from the batch it runs in."""
        updates: asyncio.Queue = asyncio.Queue()
        self.pending.append((job, updates))
        self.arrived.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        while True:
            item = await updates.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
                if self.wait_s > 0:  # idle until now: let the rest of a burst join this batch
                    await asyncio.sleep(self.wait_s)
            await self._run(self.take())

    def take(self) -> list[tuple[Any, asyncio.Queue]]:
        """The oldest jobs that fit in `max_rows` rows (always at least one: a larger job runs alone)."""
        batch = [self.pending.popleft()]
        rows = self.rows_of(batch[0][0])
        while self.pending and rows + self.rows_of(self.pending[0][0]) <= self.max_rows:
            job = self.pending.popleft()
            rows += self.rows_of(job[0])
            batch.append(job)
        return batch

    async def _run(self, batch: list[tuple[Any, asyncio.Queue]]) -> None:
        queues = [q for _, q in batch]
        ended = [False] * len(batch)
        try:
            async for out in self.run_batch([job for job, _ in batch]):
                for k, item in enumerate(out):
                    if ended[k] or item is None:
                        continue
                    if item is StopAsyncIteration:
                        ended[k] = True
                        queues[k].put_nowait(_END)
                    else:
                        queues[k].put_nowait(item)
        except Exception as e:  # the batch's requests fail, the loop serves the others (a cancellation propagates)
            log.exception("a batch failed")
            for k, q in enumerate(queues):
                if not ended[k]:
                    q.put_nowait(e)
        finally:
            for k, q in enumerate(queues):
                if not ended[k]:
                    q.put_nowait(_END)
