"""The batcher over an engine that runs two batches at once (`parallelism` 2, as OpenVINO with two streams): two
batches are in flight together, and every guarantee of the one-at-a-time batcher still holds - a bounded queue,
priorities, gone clients dropped before compute, a failing batch failing only its requests, a hung engine
detected, a clean drain. The fake engine is exact (y = 2x + 1) and each run waits for its own gate, so no test
depends on how long anything takes: a wrong path waits forever and hits the timeout."""

import asyncio
import threading

import numpy as np
import pytest

from service.batcher import Batcher, Draining, EngineUnavailable
from service.queue import QueueFull
from tests.service.fakes import POISON, AffineEngine, rows, until

pytestmark = pytest.mark.timeout(60)


class TwoAtOnce(AffineEngine):
    """Runs up to two batches at once; a batch whose first value has a gate in `gates` waits for it."""

    parallelism = 2

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gates: dict[float, threading.Event] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.finished: list[float] = []

    def _run(self, inputs):
        first = float(inputs["x"][0, 0])
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if first in self.gates:
                self.gates[first].wait(30)
            return super()._run(inputs)
        finally:
            with self.lock:
                self.running -= 1
                self.finished.append(first)


def gated(*values, **options):
    engine = TwoAtOnce().load()
    engine.gates = {float(v): threading.Event() for v in values}
    batcher = Batcher(engine, **{"max_batch_size": 8, **options})
    batcher.start()
    return engine, batcher



def submit(b, value, n=1, **kw):
    return asyncio.ensure_future(b.submit({"x": rows(value, n)}, **kw))


async def occupy(engine, b):
    """Both slots busy: a batch of value 1 and one of value 2, each waiting for its gate."""
    work = [submit(b, 1)]
    await until(lambda: engine.running == 1)  # (submitted together they would share one batch)
    work.append(submit(b, 2))
    await until(lambda: engine.running == 2)
    return work


def test_two_batches_run_at_once_and_arrivals_form_the_next_one():
    async def main():
        engine, b = gated(1, 2)
        first = submit(b, 1)
        await until(lambda: engine.running == 1)
        second = submit(b, 2)  # a slot is free: runs now, beside the first, not after it
        await until(lambda: engine.running == 2)
        both_running = engine.most_at_once
        later = [submit(b, 10 + i) for i in range(5)]
        await until(lambda: b.depth == 5)  # both slots busy: these wait and form the next batch
        for gate in engine.gates.values():
            gate.set()
        results = await asyncio.gather(first, second, *later)
        await b.drain(5)
        return engine, b, both_running, results

    engine, b, both_running, results = asyncio.run(main())
    assert b.parallelism == 2 and both_running == 2
    assert sorted(engine.batches) == [1, 1, 5]
    for value, r in zip([1, 2, *range(10, 15)], results, strict=True):
        np.testing.assert_array_equal(r.outputs["y"], 2 * rows(value, 1) + 1)


def test_the_queue_stays_bounded_and_priorities_hold_while_both_slots_are_busy():
    async def main():
        engine, b = gated(1, 2, max_batch_size=1, max_queue_size=6)
        busy = await occupy(engine, b)
        order = [(3, 0), (4, 2), (5, 1), (6, 2), (7, 1), (8, 0)]  # (value, priority): 0 = default level, last
        waiting = [submit(b, v, priority=p) for v, p in order]
        await until(lambda: b.depth == len(order))
        with pytest.raises(QueueFull):
            await b.submit({"x": rows(9, 1)})
        engine.gates[1.0].set()  # one slot frees: the queue drains through it in priority order
        await asyncio.gather(*waiting)
        engine.gates[2.0].set()
        await asyncio.gather(*busy)
        await b.drain(5)
        return engine

    engine = asyncio.run(main())
    assert engine.seen[1:7] == [5.0, 7.0, 4.0, 6.0, 3.0, 8.0]  # after the first of the two busy ones


def test_a_failing_batch_fails_only_its_requests_while_the_other_runs_on():
    async def main():
        engine, b = gated(1)
        running = submit(b, 1)
        await until(lambda: engine.running == 1)
        bad = asyncio.ensure_future(b.submit({"x": np.full((1, 4), POISON, np.float32)}))
        outcome = await asyncio.gather(bad, return_exceptions=True)  # ran in the second slot and failed
        engine.gates[1.0].set()
        good = await running
        after = await b.submit({"x": rows(3, 1)})
        await b.drain(5)
        return outcome[0], good, after

    bad, good, after = asyncio.run(main())
    assert isinstance(bad, Exception) and "poisoned" in str(bad)
    np.testing.assert_array_equal(good.outputs["y"], 2 * rows(1, 1) + 1)
    np.testing.assert_array_equal(after.outputs["y"], 2 * rows(3, 1) + 1)


def test_a_caller_gone_while_both_slots_are_busy_is_dropped_before_compute():
    async def main():
        engine, b = gated(1, 2)
        busy = await occupy(engine, b)
        gone, stays = submit(b, 5), submit(b, 6)
        await until(lambda: b.depth == 2)
        gone.cancel()
        await asyncio.sleep(0)
        for gate in engine.gates.values():
            gate.set()
        kept = await stays
        await asyncio.gather(*busy)
        await b.drain(5)
        return engine, b, kept

    engine, b, kept = asyncio.run(main())
    assert 5.0 not in engine.seen and 6.0 in engine.seen and b.dropped == 1
    np.testing.assert_array_equal(kept.outputs["y"], 2 * rows(6, 1) + 1)


def test_two_hung_calls_keep_it_not_ready_until_both_are_back():
    async def main():
        engine, b = gated(1, 2, max_batch_size=1, engine_timeout_s=0.2)  # one row a batch: two batches at once
        stuck = await asyncio.gather(submit(b, 1), submit(b, 2), return_exceptions=True)
        both_ran = engine.most_at_once == 2
        with pytest.raises(EngineUnavailable, match="engine_timeout_s"):
            await b.submit({"x": rows(3, 1)})
        engine.gates[1.0].set()
        await until(lambda: 1.0 in engine.finished and b._hung_calls == 1)
        still_hung = b.hung is not None and not b.ready
        engine.gates[2.0].set()
        await until(lambda: b.ready)
        after = await b.submit({"x": rows(4, 1)})
        await b.drain(5)
        return stuck, both_ran, still_hung, after

    stuck, both_ran, still_hung, after = asyncio.run(main())
    assert both_ran
    assert all(isinstance(o, EngineUnavailable) for o in stuck), stuck
    assert still_hung  # one call back, the other still out: not ready
    np.testing.assert_array_equal(after.outputs["y"], 2 * rows(4, 1) + 1)


def test_drain_waits_for_both_batches_and_the_queue_then_refuses_new_work():
    async def main():
        engine, b = gated(1, 2)
        work = await occupy(engine, b)
        work.append(submit(b, 7))
        await until(lambda: b.depth == 1)
        drain = asyncio.ensure_future(b.drain(10))
        await asyncio.sleep(0)
        with pytest.raises(Draining):
            await b.submit({"x": rows(8, 1)})
        for gate in engine.gates.values():
            gate.set()
        results = await asyncio.gather(*work)
        return await drain, results

    idle, results = asyncio.run(main())
    assert idle is True
    for value, r in zip([1, 2, 7], results, strict=True):
        np.testing.assert_array_equal(r.outputs["y"], 2 * rows(value, 1) + 1)


def test_drain_past_its_deadline_answers_both_running_batches_and_the_queue():
    async def main():
        engine, b = gated(1, 2)
        work = await occupy(engine, b)
        work.append(submit(b, 7))
        await until(lambda: b.depth == 1)
        idle = await b.drain(0.1)  # the gates stay shut past the deadline
        outcomes = await asyncio.gather(*work, return_exceptions=True)
        for gate in engine.gates.values():
            gate.set()
        return idle, outcomes

    idle, outcomes = asyncio.run(main())
    assert idle is False  # both engine threads still busy: abandoned, never waited for
    assert all(isinstance(o, Draining) for o in outcomes), outcomes
