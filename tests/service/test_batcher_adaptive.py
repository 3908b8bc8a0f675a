"""The batcher's default (adaptive) path, priorities, the 3.10-proof queue and a hung engine, on the real event
loop with the exact fake engine (y = 2x + 1). No test depends on how long anything takes: a wrong path would
wait forever and hit the timeout instead."""

import asyncio
import threading

import numpy as np
import pytest

from service.batcher import Batcher, EngineUnavailable
from service.queue import QueueFull, RequestQueue
from tests.service.fakes import AffineEngine, rows, until

pytestmark = pytest.mark.timeout(60)


def gated(**options):
    """A started batcher over the exact fake engine whose runs wait for `gate`: (gate, engine, batcher)."""
    gate = threading.Event()
    engine = AffineEngine(gate=gate).load()
    batcher = Batcher(engine, **options)
    batcher.start()
    return gate, engine, batcher



def test_the_default_is_adaptive_a_lone_request_runs_at_once():
    async def main():
        engine = AffineEngine().load()
        b = Batcher(engine, max_batch_size=8)  # the defaults: no batching window
        assert b.max_queue_delay_s == 0
        b.start()
        r = await b.submit({"x": rows(5, 1)})
        await b.drain(5)
        return engine, r

    engine, r = asyncio.run(main())
    np.testing.assert_array_equal(r.outputs["y"], 2 * rows(5, 1) + 1)
    assert engine.batches == [1]


def test_a_lone_request_is_not_held_for_company_even_with_a_long_window_elsewhere():
    """Two batchers side by side: the one with a 60 s window still holds its request when the adaptive one has
    answered - the adaptive path never waits alone."""

    async def main():
        windowed = Batcher(AffineEngine().load(), max_batch_size=8, max_queue_delay_s=60.0)
        adaptive = Batcher(AffineEngine().load(), max_batch_size=8)
        windowed.start(), adaptive.start()
        held = asyncio.ensure_future(windowed.submit({"x": rows(1, 1)}))
        answered = await adaptive.submit({"x": rows(1, 1)})
        still_waiting = not held.done()
        held.cancel()
        await asyncio.gather(windowed.drain(1), adaptive.drain(1))
        return answered, still_waiting

    answered, still_waiting = asyncio.run(main())
    assert answered.batch_size == 1 and still_waiting


def test_arrivals_during_a_running_batch_form_the_next_batch():
    async def main():
        gate, engine, b = gated(max_batch_size=8)
        first = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await until(engine.entered.is_set)  # running, blocked on the gate
        later = [asyncio.ensure_future(b.submit({"x": rows(10 + i, 1)})) for i in range(5)]
        await until(lambda: b.depth == 5)
        gate.set()
        results = await asyncio.gather(first, *later)
        await b.drain(5)
        return engine, results

    engine, results = asyncio.run(main())
    assert engine.batches == [1, 5]
    for i, r in enumerate(results[1:]):
        np.testing.assert_array_equal(r.outputs["y"], 2 * rows(10 + i, 1) + 1)


def test_higher_priority_is_served_first_fifo_within_a_level():
    async def main():
        gate, engine, b = gated(max_batch_size=1)
        first = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await until(engine.entered.is_set)
        order = [(1, 0), (2, 0), (3, 2), (4, 1), (5, 2), (6, 1)]  # (value, priority): 0 = default level, last
        waiting = [asyncio.ensure_future(b.submit({"x": rows(v, 1)}, priority=p)) for v, p in order]
        await until(lambda: b.depth == len(order))
        gate.set()
        await asyncio.gather(first, *waiting)
        await b.drain(5)
        return engine

    engine = asyncio.run(main())
    assert engine.seen[-7:] == [0.0, 4.0, 6.0, 3.0, 5.0, 1.0, 2.0]


def test_the_queue_waits_without_catching_any_timeout_error():
    """`get(timeout)` returns None when nothing arrives (asyncio.wait, never wait_for: on 3.10 the built-in
    TimeoutError is not asyncio's, which broke every batch closed by the window)."""

    async def main():
        q = RequestQueue(2)
        assert await q.get(0.01) is None and await q.get(0) is None
        q.put("a")
        q.put("b", priority=1)
        with pytest.raises(QueueFull):
            q.put("c")
        q.put_back("z")  # never refused; first of its level
        late = asyncio.get_running_loop().call_later(0.01, q.put, "late")
        got = [await q.get(), await q.get(), await q.get()]
        waited = await q.get()  # empty: waits for the late arrival
        late.cancel()
        return got, waited

    got, waited = asyncio.run(main())
    assert got == ["b", "z", "a"] and waited == "late"


def test_a_hung_engine_fails_its_batch_refuses_work_and_comes_back():
    async def main():
        gate, engine, b = gated(max_batch_size=1, engine_timeout_s=0.2)
        stuck = asyncio.ensure_future(b.submit({"x": rows(1, 1)}))
        queued = asyncio.ensure_future(b.submit({"x": rows(2, 1)}))
        outcomes = await asyncio.gather(stuck, queued, return_exceptions=True)
        not_ready = (b.ready, b.hung, b.hung_for >= 0)
        with pytest.raises(EngineUnavailable, match="engine_timeout_s"):
            await b.submit({"x": rows(3, 1)})
        gate.set()  # the engine comes back
        await until(lambda: b.ready)
        after = await b.submit({"x": rows(4, 1)})
        await b.drain(5)
        return outcomes, not_ready, after

    outcomes, not_ready, after = asyncio.run(main())
    assert all(isinstance(o, EngineUnavailable) for o in outcomes), outcomes
    assert not_ready[0] is False and "engine_timeout_s=0.2" in not_ready[1] and not_ready[2]
    np.testing.assert_array_equal(after.outputs["y"], 2 * rows(4, 1) + 1)


def test_drain_does_not_wait_for_a_hung_engine_past_its_deadline():
    async def main():
        gate, engine, b = gated(max_batch_size=1, engine_timeout_s=30)
        stuck = asyncio.ensure_future(b.submit({"x": rows(1, 1)}))
        await until(engine.entered.is_set)
        idle = await b.drain(0.2)  # the gate stays shut: the call is still running at the deadline
        answer = await asyncio.gather(stuck, return_exceptions=True)
        gate.set()
        return idle, answer[0]

    idle, answer = asyncio.run(main())
    assert idle is False
    assert "shut down" in str(answer)  # answered (Draining), not left hanging


def test_a_request_larger_than_a_batch_holds_one_place_and_takes_turns_with_the_others():
    async def main():
        gate, engine, b = gated(max_batch_size=4, max_queue_size=2)
        first = asyncio.ensure_future(b.submit({"x": rows(0, 1)}))
        await until(engine.entered.is_set)
        big = asyncio.ensure_future(b.submit({"x": rows(100, 8)}))  # 8 = max_batch_size x max_queue_size
        small = asyncio.ensure_future(b.submit({"x": rows(7, 1)}))
        await until(lambda: b.depth == 2)  # eight rows, one place
        with pytest.raises(QueueFull):
            await b.submit({"x": rows(8, 1)})
        answered_first = []
        small.add_done_callback(lambda _: answered_first.append("small" if not big.done() else "big"))
        gate.set()
        results = await asyncio.gather(first, big, small)
        await b.drain(5)
        return engine, results, answered_first

    engine, (_, big, small), answered_first = asyncio.run(main())
    np.testing.assert_array_equal(big.outputs["y"], 2 * rows(100, 8) + 1)  # slices joined in order
    np.testing.assert_array_equal(small.outputs["y"], 2 * rows(7, 1) + 1)
    assert engine.batches == [1, 4, 4, 1] and answered_first == ["small"]  # not held behind the whole request
