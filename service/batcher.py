"""A dynamic batcher for one engine: a bounded queue, one worker, the engine run off the event loop.

The worker waits for the first request, then collects more until the batch holds `max_batch_size` rows, a
preferred size is reached with nothing else waiting, or `first_arrival + max_queue_delay` passes. Requests
whose caller has gone, or whose queue deadline has passed, are dropped before compute and never run. A
failure fails every request of its batch and only those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from engines.base import Engine, EngineError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at `max_queue_size`: come back later (503 + Retry-After)."""


class TooManyRows(ValueError):
    """The request holds more rows than the whole queue can ever take (413): it could never run."""


class QueueTimeout(Exception):
    """The request's queue deadline passed before it could run."""


class Draining(Exception):
    """The server is shutting down and accepts no new work."""


@dataclass
class Pending:
    inputs: dict[str, np.ndarray]
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None = None
    started_at: float | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def key(self) -> tuple:
        """Requests can share a batch only when every non-batch dimension agrees."""
        return tuple((name, a.shape[1:]) for name, a in sorted(self.inputs.items()))


@dataclass(frozen=True)
class Result:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class Batch:
    """What a finished batch hands to observers (metrics, shadow): its inputs, outputs and timing."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    compute_s: float
    rows: int


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        preferred_batch_sizes: list[int] = (),
        max_queue_size: int = 256,
        on_batch: Callable[[Batch], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = set(preferred_batch_sizes)
        self.on_batch = on_batch
        self.on_drop = on_drop
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max_queue_size)
        self._held: deque[Pending] = deque()  # taken from the queue but left for the next batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task | None = None
        self._batch: list[Pending] = []  # the batch being collected or run: answered even if the worker is cancelled
        self._running = False
        self.dead: str | None = None  # why the worker stopped, if it ever stops other than by drain()
        self.accepting = True
        self.dropped = 0

    # -- the request side ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    async def submit(self, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Result:
        """Queue `inputs` (already checked) and wait for the outputs; split if larger than a batch."""
        rows = next(iter(inputs.values())).shape[0]
        capacity = self.max_batch_size * self._queue.maxsize
        if self._queue.maxsize > 0 and rows > capacity:
            raise TooManyRows(f"request has {rows} rows; this model takes at most {capacity} per request "
                              f"(max_batch_size {self.max_batch_size} x max_queue_size {self._queue.maxsize})")
        if rows <= self.max_batch_size:
            return await self._submit_one(inputs, timeout_s)
        chunks = [{k: v[i : i + self.max_batch_size] for k, v in inputs.items()}
                  for i in range(0, rows, self.max_batch_size)]
        tasks = [asyncio.ensure_future(self._submit_one(chunk, timeout_s)) for chunk in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:  # one chunk failed (or our caller left): the others are not wanted either
            for task in tasks:
                task.cancel()
            raise
        outputs = {k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs}
        return Result(outputs, max(p.queue_s for p in parts), sum(p.compute_s for p in parts),
                      max(p.batch_size for p in parts))

    async def _submit_one(self, inputs: dict[str, np.ndarray], timeout_s: float | None) -> Result:
        if self.dead is not None:
            raise EngineError(f"this model's batcher has stopped: {self.dead}")
        if not self.accepting:
            raise Draining("the server is shutting down")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = Pending(inputs, loop.create_future(), now, None if timeout_s is None else now + timeout_s)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"queue is full ({self._queue.maxsize} requests waiting)") from None
        if timeout_s is not None:
            pending.timer = loop.call_later(timeout_s, self._expire, pending)
        try:
            return await pending.future
        finally:
            if not pending.future.done():  # our caller was cancelled (client gone): drop before compute
                pending.future.cancel()
            if pending.timer is not None:
                pending.timer.cancel()

    def _expire(self, pending: Pending) -> None:
        if pending.started_at is None and not pending.future.done():
            waited = time.perf_counter() - pending.enqueued_at
            pending.future.set_exception(QueueTimeout(f"request timeout expired after {waited * 1e3:.1f} ms in the queue"))

    @property
    def busy(self) -> bool:
        """A batch is being collected or run, or requests are waiting."""
        return self._running or self.depth > 0

    async def run_aside(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Run `inputs` on this batcher's engine thread, outside the queue (shadow runs): (outputs, seconds)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, _timed, self.engine, inputs)

    # -- the worker ------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._worker.add_done_callback(self._worker_done)

    @property
    def alive(self) -> bool:
        """The worker is running (or not started yet): False once it has died, which makes the model not ready."""
        return self.dead is None

    def _worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled() and not self.accepting:
            return  # stopped by drain()
        self.dead = "the worker was cancelled" if task.cancelled() else f"the worker died: {task.exception()!r}"
        log.error("batcher for %s stopped unexpectedly: %s", type(self.engine).__name__, self.dead)
        error = EngineError(f"this model's batcher has stopped: {self.dead}")
        _fail([*self._batch, *self._held, *_drain_queue(self._queue)], error)
        self._held.clear()

    async def _next(self, timeout: float | None) -> Pending | None:
        if self._held:
            return self._held.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def _live(self, pending: Pending) -> bool:
        if pending.future.done():  # cancelled by a gone client, or already expired
            self.dropped += 1
            if self.on_drop:
                self.on_drop("cancelled" if pending.future.cancelled() else "expired")
            return False
        return True

    async def _collect(self, batch: list[Pending]) -> None:
        """Fill `batch` (owned by the loop, so a cancelled collect still answers what it took)."""
        first = await self._next(None)
        while not self._live(first):
            first = await self._next(None)
        self._running = True  # from here until the batch is answered, drain must wait for us
        batch.append(first)
        rows = first.rows
        close_at = first.enqueued_at + self.max_queue_delay_s
        while rows < self.max_batch_size:
            waiting = bool(self._held) or not self._queue.empty()
            if rows in self.preferred and not waiting:
                break
            item = await self._next(close_at - time.perf_counter())
            if item is None:
                break
            if not self._live(item):
                continue
            if item.key != first.key or rows + item.rows > self.max_batch_size:
                self._held.appendleft(item)  # first in line for the next batch
                break
            batch.append(item)
            rows += item.rows

    async def _loop(self) -> None:
        """One batch per turn. Cancelled (drain timed out): the batch in hand is answered with Draining.
        Anything else going wrong fails that batch only, and the loop goes on."""
        loop = asyncio.get_running_loop()
        while True:
            self._batch = []
            try:
                await self._collect(self._batch)
                batch = [p for p in self._batch if self._live(p)]  # last look before compute
                if batch:
                    await self._run(loop, batch)
            except asyncio.CancelledError:
                _fail(self._batch, Draining("the server shut down before this request was answered"))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in batching must not stop the worker
                log.exception("batch of %d requests failed outside the engine", len(self._batch))
                _fail(self._batch, EngineError(f"the batch failed: {type(exc).__name__}: {exc}"))
            finally:
                self._running = False
                self._batch = []

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]) -> None:
        started = time.perf_counter()
        for p in batch:
            p.started_at = started
        names = list(batch[0].inputs)
        inputs = {n: np.concatenate([p.inputs[n] for p in batch]) if len(batch) > 1 else batch[0].inputs[n]
                  for n in names}
        try:
            outputs, compute_s = await loop.run_in_executor(self._executor, _timed, self.engine, inputs)
        except Exception as exc:  # noqa: BLE001 - every request of this batch gets the same error
            log.warning("batch of %d rows failed: %s", len(batch), exc)
            _fail(batch, exc)
            return
        total = int(inputs[names[0]].shape[0])
        short = {k: np.shape(v)[:1] for k, v in outputs.items() if np.ndim(v) == 0 or np.shape(v)[0] != total}
        if short:
            raise EngineError(f"the engine returned outputs whose batch axis is not {total} rows: {short}")
        offset = 0
        for p in batch:
            rows = p.rows
            if not p.future.done():
                part = {k: v[offset : offset + rows] for k, v in outputs.items()}
                p.future.set_result(Result(part, started - p.enqueued_at, compute_s, int(inputs[names[0]].shape[0])))
            offset += rows
        if self.on_batch:
            try:
                self.on_batch(Batch(inputs, outputs, compute_s, offset))
            except Exception:  # an observer must never break serving
                log.exception("on_batch observer failed")

    # -- shutdown --------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, finish what is queued (up to `timeout_s`), then stop the worker."""
        self.accepting = False
        end = time.perf_counter() + timeout_s
        while (self.depth or self._running) and time.perf_counter() < end:
            await asyncio.sleep(0.005)
        if self.depth or self._running:
            log.warning("drain timed out with %d requests still queued", self.depth)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for p in [*self._held, *_drain_queue(self._queue)]:
            if not p.future.done():
                p.future.set_exception(Draining("the server shut down before this request ran"))
        self._held.clear()
        # an engine call still running (drain timed out) is waited for off the event loop, so the engine is
        # not closed under it and the loop keeps answering
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _timed(engine: Engine, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    outputs = engine.infer(inputs)
    return outputs, time.perf_counter() - start


def _fail(batch: list[Pending], error: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(error)


def _drain_queue(queue: asyncio.Queue) -> list[Pending]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
