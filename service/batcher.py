"""A dynamic batcher for one engine: a bounded priority queue, one worker, the engine run on its own thread.

Adaptive by default: the worker waits for the first request, takes whatever else is queued at that moment (up to
`max_batch_size` rows) and runs it at once, so a request arriving at an idle engine never waits; requests that
arrive while a batch runs queue up and form the next one. `max_queue_delay_s > 0` adds Triton's fixed window:
the worker keeps collecting until `first_arrival + max_queue_delay` (or a full / preferred batch), which pays
only where a bigger batch costs little more than a small one (GPUs). Requests whose caller has gone, or whose
own timeout passed, are dropped before compute. A failure fails every request of its batch and only those.

Up to `parallelism` batches run at once (the engine's `parallelism`: OpenVINO's infer requests / streams; 1 for
the others): the worker collects the next batch as soon as a slot is free, and each batch runs on its own engine
thread, so streams overlap. With one slot the next batch forms while the current one runs, as before.

An engine call that outlasts `engine_timeout_s` fails its batch (503) and the batcher stops taking work until
the call returns (`hung` says why, `hung_for` how long); the server turns not-ready, then not-live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from engines.base import Engine, EngineError, InputError
from service.engine_thread import EngineThread
from service.pending import (
    Batch,
    Draining,
    EngineUnavailable,
    Pending,
    QueueTimeout,
    Result,
    Slice,
    TooManyRows,
)
from service.queue import QueueFull, RequestQueue

__all__ = ["Batch", "Batcher", "Draining", "EngineUnavailable", "Pending", "QueueFull", "QueueTimeout", "Result",
           "Slice", "TooManyRows"]
log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: list[int] = (),
        max_queue_size: int = 256,
        engine_timeout_s: float | None = None,
        parallelism: int | None = None,
        on_batch: Callable[[Batch], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = set(preferred_batch_sizes)
        self.engine_timeout_s = engine_timeout_s
        self.on_batch = on_batch
        self.on_drop = on_drop
        self.parallelism = max(1, parallelism or getattr(engine, "parallelism", 1))  # batches run at once
        self._queue: RequestQueue[Pending] = RequestQueue(max_queue_size)
        self._executor = EngineThread(f"engine-{type(engine).__name__}", threads=self.parallelism)
        self._slots = asyncio.Semaphore(self.parallelism)  # one per batch in flight; taken before collecting
        self._worker: asyncio.Task | None = None
        self._batch: list[Slice] = []  # the batch being collected: answered even if the worker is cancelled
        self._inflight: dict[asyncio.Task, list[Slice]] = {}  # batches running, each on its own task
        self._running = False  # a batch is being collected (from its first request until it is handed off)
        self._hung_calls = 0  # engine calls past engine_timeout_s that have not come back
        self.dead: str | None = None  # why the worker stopped, if it ever stops other than by drain()
        self.hung: str | None = None  # why the engine is not taking work (a call past engine_timeout_s)
        self._hung_at: float | None = None
        self.accepting = True
        self.dropped = 0

    # -- the request side ------------------------------------------------------------------------
    @property
    def max_queue_size(self) -> int:
        return self._queue.maxsize

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def hung_for(self) -> float:
        """Seconds since the engine call that is not coming back passed its timeout (0 when none)."""
        return 0.0 if self._hung_at is None else time.perf_counter() - self._hung_at

    async def submit(self, inputs: dict[str, np.ndarray], timeout_s: float | None = None, priority: int = 0) -> Result:
        """Queue `inputs` (already checked) and wait for the outputs. A request larger than a batch takes one place
        and runs in slices of at most `max_batch_size` rows, interleaved with the other requests of its level.

        `timeout_s`: the request's own queue deadline (QueueTimeout); `priority`: 1 highest, 0 the default level."""
        self.check_rows(next(iter(inputs.values())).shape[0])
        return await self._submit_one(inputs, timeout_s, priority)

    def check_rows(self, rows: int) -> None:
        """TooManyRows (413) for a request larger than the whole queue can ever take."""
        capacity = self.max_batch_size * self._queue.maxsize
        if rows > capacity:
            raise TooManyRows(f"request has {rows} rows; this model takes at most {capacity} per request "
                              f"(max_batch_size {self.max_batch_size} x max_queue_size {self._queue.maxsize})")

    async def _submit_one(self, inputs: dict[str, np.ndarray], timeout_s: float | None, priority: int) -> Result:
        self._check_open()
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = Pending(inputs, loop.create_future(), now, None if timeout_s is None else now + timeout_s, priority)
        self._queue.put(pending, priority)
        if timeout_s is not None:
            pending.timer = loop.call_later(timeout_s, self._expire, pending)
        try:
            return await pending.future
        finally:
            if not pending.future.done():  # our caller was cancelled (client gone): drop before compute
                pending.future.cancel()
                self._drop(pending, "cancelled")
            if pending.timer is not None:
                pending.timer.cancel()

    def _check_open(self) -> None:
        if self.dead is not None:
            raise EngineError(f"this model's batcher has stopped: {self.dead}")
        if self.hung is not None:
            raise EngineUnavailable(self.hung)
        if not self.accepting:
            raise Draining("the server is shutting down")

    def _expire(self, pending: Pending) -> None:
        if pending.started_at is None and not pending.future.done():
            waited = time.perf_counter() - pending.enqueued_at
            pending.future.set_exception(QueueTimeout(f"request timeout expired after {waited * 1e3:.1f} ms in the queue"))
            self._drop(pending, "expired")

    def _drop(self, pending: Pending, reason: str) -> None:
        """Out of the queue at once (its place freed), counted; one already taken into a batch is left to `_live`."""
        if self._queue.remove(pending):
            self.dropped += 1
            if self.on_drop:
                self.on_drop(reason)

    @property
    def busy(self) -> bool:
        """A batch is being collected or run, or requests are waiting."""
        return self._running or bool(self._inflight) or self.depth > 0

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

    @property
    def ready(self) -> bool:
        """Takes work: alive, and its engine is not stuck in a call past its timeout."""
        return self.dead is None and self.hung is None

    def _worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled() and not self.accepting:
            return  # stopped by drain()
        self.dead = "the worker was cancelled" if task.cancelled() else f"the worker died: {task.exception()!r}"
        log.error("batcher for %s stopped unexpectedly: %s", type(self.engine).__name__, self.dead)
        running = [s for batch in self._inflight.values() for s in batch]
        _fail([*_owners([*self._batch, *running]), *self._queue.take_all()],
              EngineError(f"this model's batcher has stopped: {self.dead}"))

    def _live(self, pending: Pending) -> bool:
        if pending.future.done():  # cancelled by a gone client, or already expired
            self.dropped += 1
            if self.on_drop:
                self.on_drop("cancelled" if pending.future.cancelled() else "expired")
            return False
        return True

    async def _collect(self, batch: list[Slice]) -> None:
        """Fill `batch` (owned by the loop, so a cancelled collect still answers what it took)."""
        first = await self._queue.get()
        while not self._live(first):
            first = await self._queue.get()
        self._running = True  # from here until the batch is handed off (then _inflight), drain waits for us
        batch.append(self._slice(first, self.max_batch_size))
        rows = batch[0].rows
        close_at = first.enqueued_at + self.max_queue_delay_s
        while rows < self.max_batch_size:
            if rows in self.preferred and not self.depth:
                break
            item = await self._queue.get(close_at - time.perf_counter())
            if item is None:
                break
            if not self._live(item):
                continue
            room = self.max_batch_size - rows
            if item.key != first.key or (room < item.left and item.rows <= self.max_batch_size):
                self._queue.put_back(item, item.priority)  # kept whole: first in line for the next batch
                break
            batch.append(self._slice(item, room))  # a request larger than a batch fills the room left
            rows += batch[-1].rows

    def _slice(self, pending: Pending, room: int) -> Slice:
        """The next rows of `pending` (at most `room`); what is left goes back to the end of its level."""
        part = Slice(pending, pending.taken, pending.taken + min(room, pending.left))
        pending.taken = part.stop
        if pending.left:
            self._queue.put_back(pending, pending.priority, first=False)
        return part

    async def _loop(self) -> None:
        """One batch per free slot: take a slot, collect, hand the batch to its own task, repeat. Cancelled (drain
        timed out): the batch in hand is answered with Draining. Anything else going wrong fails that batch only,
        and the loop goes on."""
        while True:
            await self._slots.acquire()
            handed_off = False
            self._batch = []
            try:
                await self._collect(self._batch)
                batch = [s for s in self._batch if self._live(s.pending)]  # last look before compute
                if batch:
                    self._launch(batch)
                    handed_off = True
            except asyncio.CancelledError:
                _fail(_owners(self._batch), Draining("the server shut down before this request was answered"))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in batching must not stop the worker
                log.exception("batch of %d requests failed outside the engine", len(self._batch))
                _fail(_owners(self._batch), EngineError(f"the batch failed: {type(exc).__name__}: {exc}"))
            finally:
                if not handed_off:
                    self._slots.release()
                self._running = False
                self._batch = []

    def _launch(self, batch: list[Slice]) -> None:
        """Run `batch` on its own task; its slot is given back when it is answered."""
        task = asyncio.get_running_loop().create_task(self._answer(batch), name="batch")
        self._inflight[task] = batch
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task) -> None:
        self._inflight.pop(task, None)
        self._slots.release()

    async def _answer(self, batch: list[Slice]) -> None:
        """Run one batch; whatever goes wrong fails this batch's requests and only those."""
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            _fail(_owners(batch), Draining("the server shut down before this request was answered"))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in batching must not stop the others
            log.exception("batch of %d requests failed outside the engine", len(batch))
            _fail(_owners(batch), EngineError(f"the batch failed: {type(exc).__name__}: {exc}"))

    async def _run(self, batch: list[Slice]) -> None:
        started = time.perf_counter()
        for s in batch:
            s.pending.started_at = s.pending.started_at or started
        inputs = _concatenate(batch)
        try:
            outputs, compute_s = await self._call(inputs, _owners(batch))
        except InputError as exc:  # the engine refused the content: find whose, run the others
            if len(batch) == 1:
                _fail(_owners(batch), exc)
                return
            for s in batch:
                await self._run([s])
            return
        except Exception as exc:  # noqa: BLE001 - every request of this batch gets the same error
            log.warning("batch of %d rows failed: %s", sum(s.rows for s in batch), exc)
            _fail(_owners(batch), exc)
            return
        total = next(iter(inputs.values())).shape[0]
        short = {k: np.shape(v)[:1] for k, v in outputs.items() if np.ndim(v) == 0 or np.shape(v)[0] != total}
        if short:
            raise EngineError(f"the engine returned outputs whose batch axis is not {total} rows: {short}")
        offset = 0
        for s in batch:
            s.deliver({k: v[offset : offset + s.rows] for k, v in outputs.items()}, compute_s, total)
            offset += s.rows
        if self.on_batch:
            try:
                self.on_batch(Batch(inputs, outputs, compute_s, offset))
            except Exception:  # an observer must never break serving
                log.exception("on_batch observer failed")

    async def _call(self, inputs: dict[str, np.ndarray], batch: list[Pending]) -> tuple[dict[str, np.ndarray], float]:
        """Run the engine; past `engine_timeout_s`, fail the batch and everything queued (503), refuse new work
        until every such call returns, and wait for it here (its engine thread is busy until then anyway). Other
        batches already running go on."""
        call = asyncio.get_running_loop().run_in_executor(self._executor, _timed, self.engine, inputs)
        done, _ = await asyncio.wait({call}, timeout=self.engine_timeout_s)
        if done:
            return call.result()
        self._hung_calls += 1
        if self.hung is None:
            self._hung_at = time.perf_counter()
            self.hung = f"an engine call has run for more than engine_timeout_s={self.engine_timeout_s:g} s"
            log.error("%s: %s; not ready until it returns", type(self.engine).__name__, self.hung)
        error = EngineUnavailable(self.hung)
        _fail([*batch, *self._queue.take_all()], error)
        try:
            await asyncio.wait({call})
        finally:
            if call.done():
                self._hung_calls -= 1
                log.warning("the engine came back after %.1f s", self.hung_for + self.engine_timeout_s)
                if not self._hung_calls:
                    self.hung, self._hung_at = None, None
                call.exception()  # retrieved, so asyncio does not log it: its batch was answered already
        raise error

    # -- shutdown --------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting, finish what is queued (up to `timeout_s`), then stop the worker. True when the engine
        thread is idle at the end (safe to close the engine); False when a call is still running past the
        deadline: that thread is abandoned (a daemon), never waited for."""
        self.accepting = False
        end = time.perf_counter() + timeout_s
        while self.busy and time.perf_counter() < end and self.hung is None:
            await asyncio.sleep(0.005)
        if self.busy:
            log.warning("drain stopped with %d requests still queued, %d batches running", self.depth,
                        len(self._inflight))
        for task in [*([self._worker] if self._worker is not None else []), *self._inflight]:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        _fail(self._queue.take_all(), Draining("the server shut down before this request ran"))
        self._executor.shutdown(wait=False)
        while self._executor.busy_since is not None and time.perf_counter() < end:
            await asyncio.sleep(0.01)
        return self._executor.busy_since is None


def _concatenate(batch: list[Slice]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    parts = [s.inputs for s in batch]
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


def _owners(batch: list[Slice]) -> list[Pending]:
    return list({id(s.pending): s.pending for s in batch}.values())


def _timed(engine: Engine, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    outputs = engine.infer(inputs)
    return outputs, time.perf_counter() - start


def _fail(batch: list[Pending], error: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(error)
