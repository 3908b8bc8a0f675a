import asyncio
import threading

import numpy as np
import pytest

from engines.base import EngineError
from service.batcher import Batcher, Draining, QueueFull, QueueTimeout, TooManyRows
from tests.service.fakes import POISON, AffineEngine, rows

pytestmark = pytest.mark.timeout(30)


def make(engine, **kw):
    opts = dict(max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=64)
    opts.update(kw)
    return Batcher(engine, **opts)


async def started(batcher):
    batcher.start()
    return batcher


def test_concurrent_requests_form_batches_and_get_their_own_rows():
    async def main():
        engine = AffineEngine().load()
        b = await started(make(engine))
        xs = [rows(10 * i, 1) for i in range(8)]
        results = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
        await b.drain(5)
        return engine, xs, results

    engine, xs, results = asyncio.run(main())
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(r.outputs["y"], 2 * x + 1)
    assert sum(engine.batches) == 8
    assert max(engine.batches) > 1, engine.batches  # they were batched together
    assert all(r.batch_size >= 1 for r in results)


def test_multi_row_requests_and_oversize_request_is_split_not_truncated():
    async def main():
        engine = AffineEngine(max_batch_size=4).load()
        b = await started(make(engine, max_batch_size=4))
        big = rows(0, 11)
        r = await b.submit({"x": big})
        await b.drain(5)
        return engine, big, r

    engine, big, r = asyncio.run(main())
    np.testing.assert_array_equal(r.outputs["y"], 2 * big + 1)
    assert max(engine.batches) <= 4 and sum(engine.batches) == 11


def test_failure_fails_only_its_own_batch():
    async def main():
        gate = threading.Event()
        engine = AffineEngine(gate=gate).load()
        b = await started(make(engine, max_queue_delay_s=0.0))
        first = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))  # runs alone, waits on the gate
        await asyncio.sleep(0.05)
        bad = asyncio.ensure_future(b.submit({"x": np.full((1, 4), POISON, np.float32)}))
        good = asyncio.ensure_future(b.submit({"x": rows(5, 1)}))
        gate.set()
        results = await asyncio.gather(first, bad, good, return_exceptions=True)
        await b.drain(5)
        return results

    first, bad, good = asyncio.run(main())
    np.testing.assert_array_equal(first.outputs["y"], 2 * rows(0, 1) + 1)
    # bad and good were queued together behind the first batch: both fail (same batch) or only bad fails
    assert isinstance(bad, Exception) and "poisoned" in str(bad)
    if isinstance(good, Exception):
        assert "poisoned" in str(good)


def test_later_batches_survive_a_failed_one():
    async def main():
        engine = AffineEngine().load()
        b = await started(make(engine, max_queue_delay_s=0.0))
        with pytest.raises(Exception, match="poisoned"):
            await b.submit({"x": np.full((1, 4), POISON, np.float32)})
        r = await b.submit({"x": rows(3, 2)})
        await b.drain(5)
        return r

    np.testing.assert_array_equal(asyncio.run(main()).outputs["y"], 2 * rows(3, 2) + 1)


def test_full_queue_rejects_at_once_and_expired_requests_never_run():
    async def main():
        gate = threading.Event()
        engine = AffineEngine(gate=gate).load()
        b = await started(make(engine, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2))
        blocker = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await asyncio.sleep(0.05)  # the blocker is running, the queue is empty
        expiring = asyncio.ensure_future(b.submit({"x": rows(1, 1)}, timeout_s=0.01))
        queued = asyncio.ensure_future(b.submit({"x": rows(2, 1)}))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit({"x": rows(3, 1)})
        with pytest.raises(QueueTimeout):
            await expiring  # answered while the blocker still runs
        assert not gate.is_set()
        gate.set()
        await blocker
        r = await queued
        await b.drain(5)
        return engine, r, b

    engine, r, b = asyncio.run(main())
    assert engine.batches == [1, 1]  # the expired request never ran
    np.testing.assert_array_equal(r.outputs["y"], 2 * rows(2, 1) + 1)
    assert b.dropped == 1


def test_cancelled_caller_is_dropped_before_compute():
    async def main():
        gate = threading.Event()
        engine = AffineEngine(gate=gate).load()
        b = await started(make(engine, max_batch_size=1, max_queue_delay_s=0.0))
        blocker = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit({"x": rows(1, 1)}))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await blocker
        await b.drain(5)
        return engine, b

    engine, b = asyncio.run(main())
    assert engine.batches == [1] and b.dropped == 1


def test_drain_finishes_queued_work_then_refuses_new():
    async def main():
        engine = AffineEngine().load()
        b = await started(make(engine, max_queue_delay_s=0.02))
        tasks = [asyncio.ensure_future(b.submit({"x": rows(i, 1)})) for i in range(20)]
        await asyncio.sleep(0)
        await b.drain(5)
        with pytest.raises(Draining):
            await b.submit({"x": rows(0, 1)})
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == 20
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["y"], 2 * rows(i, 1) + 1)


def test_preferred_size_dispatches_without_waiting_for_the_delay():
    async def main():
        engine = AffineEngine().load()
        b = await started(make(engine, max_queue_delay_s=30.0, preferred_batch_sizes=[2]))
        r = await asyncio.wait_for(asyncio.gather(*(b.submit({"x": rows(i, 1)}) for i in range(2))), 10)
        await b.drain(5)
        return engine, r

    engine, _ = asyncio.run(main())
    assert engine.batches == [2]


def test_drain_timeout_answers_the_batch_being_run_and_the_one_being_collected():
    """drain() cancels the worker after its timeout: requests it had taken must still get an answer (Draining)."""
    async def main():
        gate = threading.Event()
        engine = AffineEngine(gate=gate).load()
        b = await started(make(engine, max_batch_size=2, max_queue_delay_s=30.0))
        running = [asyncio.ensure_future(b.submit({"x": rows(i, 1)})) for i in range(2)]  # a full batch: runs
        await asyncio.to_thread(engine.entered.wait, 5)
        collecting = asyncio.ensure_future(b.submit({"x": rows(9, 1)}))  # waits 30 s for company
        await asyncio.sleep(0.05)
        drain = asyncio.ensure_future(b.drain(0.1))
        try:
            done = await asyncio.wait_for(asyncio.gather(*running, collecting, return_exceptions=True), 5)
        finally:
            gate.set()
            await drain
        return done

    for outcome in asyncio.run(main()):
        assert isinstance(outcome, Draining), outcome


class ShortEngine(AffineEngine):
    """Returns one row fewer than it was given when the batch holds the value 7 (a broken backend)."""

    def _run(self, inputs):
        out = super()._run(inputs)
        if (inputs["x"] == 7).any():
            return {"y": out["y"][:-1]}
        return out


def test_a_batch_that_fails_outside_the_engine_fails_alone_and_the_worker_goes_on():
    async def main():
        engine = ShortEngine().load()
        b = await started(make(engine, max_queue_delay_s=0.0))
        with pytest.raises(EngineError, match="batch axis"):
            await asyncio.wait_for(b.submit({"x": rows(7, 2)}), 5)
        later = await asyncio.wait_for(b.submit({"x": rows(1, 2)}), 5)
        alive = b.alive
        await b.drain(5)
        return later, alive

    later, alive = asyncio.run(main())
    np.testing.assert_array_equal(later.outputs["y"], 2 * rows(1, 2) + 1)
    assert alive


def test_a_dead_worker_fails_waiting_requests_and_marks_the_batcher_not_alive():
    async def main():
        gate = threading.Event()
        engine = AffineEngine(gate=gate).load()
        b = await started(make(engine, max_batch_size=1, max_queue_delay_s=0.0))
        first = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await asyncio.to_thread(engine.entered.wait, 5)
        queued = asyncio.ensure_future(b.submit({"x": rows(1, 1)}))
        await asyncio.sleep(0.01)
        b._worker.cancel()  # the worker dies for a reason the loop does not handle (not drain)
        outcomes = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 5)
        gate.set()
        with pytest.raises(EngineError, match="stopped"):
            await b.submit({"x": rows(2, 1)})
        alive = b.alive
        await b.drain(5)
        return outcomes, alive

    outcomes, alive = asyncio.run(main())
    assert not alive
    assert all(isinstance(o, Exception) for o in outcomes), outcomes


def test_a_request_larger_than_the_whole_queue_is_rejected_up_front_not_retried():
    async def main():
        engine = AffineEngine(max_batch_size=2).load()
        b = await started(make(engine, max_batch_size=2, max_queue_size=3))
        with pytest.raises(TooManyRows, match=r"7 rows.*at most 6.*max_batch_size 2 x max_queue_size 3"):
            await b.submit({"x": rows(0, 7)})
        fits = await b.submit({"x": rows(0, 6)})
        await b.drain(5)
        return engine, fits

    engine, fits = asyncio.run(main())
    np.testing.assert_array_equal(fits.outputs["y"], 2 * rows(0, 6) + 1)
    assert sum(engine.batches) == 6  # the rejected request never ran any chunk


def test_a_request_expiring_before_the_idle_worker_wakes_is_dropped_not_a_batch_failure(caplog):
    """Found by tests/service/test_fuzz.py: the item that woke the idle worker expired (and left the queue) before
    the worker ran; the queue handed back None, and the batch 'failed outside the engine'."""

    async def main():
        engine = AffineEngine().load()
        b = await started(make(engine, max_queue_delay_s=0.0))
        expired = asyncio.ensure_future(b.submit({"x": rows(1, 1)}, timeout_s=1e-9))
        with pytest.raises(QueueTimeout):
            await expired
        after = await b.submit({"x": rows(2, 1)})
        await b.drain(5)
        return engine, after

    engine, after = asyncio.run(main())
    np.testing.assert_array_equal(after.outputs["y"], 2 * rows(2, 1) + 1)
    assert engine.seen == [2.0] and "failed outside the engine" not in caplog.text
