import asyncio
import threading

import numpy as np

from service.batcher import Batch, Batcher
from service.shadow import CompareStats, Shadow
from tests.service.fakes import AffineEngine


def test_compare_percentiles_and_bootstrap_interval():
    stats = CompareStats(window=100)
    for i in range(200):  # only the last 100 are kept
        stats.add_latency("m", "v", 4, (i % 100 + 1) / 1000)
    for r in np.linspace(0.8, 1.0, 41):
        stats.add_pair("m", "v", float(r), 0.0)
    summary = stats.summary("m", "v")
    assert summary["compute_ms"]["4"]["n"] == 100
    assert abs(summary["compute_ms"]["4"]["p50"] - 50.5) < 1e-6
    lo, hi = summary["shadow"]["ratio_ci95"]
    assert lo <= summary["shadow"]["ratio_median"] <= hi and 0.8 <= lo < hi <= 1.0
    assert stats.summary("m", "other")["shadow"] == {"pairs": 0, "ratio_median": None, "ratio_ci95": None,
                                                       "max_abs_error": None, "agreement_mean": None,
                                                       "agreement_min": None}


def test_shadow_reruns_sampled_batches_and_skips_while_busy():
    async def main():
        engine = AffineEngine().load()
        unfused = Batcher(engine, max_batch_size=8, max_queue_delay_s=0.0)  # idle: never started
        pairs = []
        shadow = Shadow("m", "affine", unfused, rate=1.0, record=lambda r, e, a: pairs.append((r, e, a)), seed=0)
        x = np.ones((2, 4), np.float32)
        batch = Batch({"x": x}, {"y": 2 * x + 1.5}, compute_s=0.001, rows=2)  # off by 0.5 from unfused
        first, second = shadow.offer(batch), shadow.offer(batch)  # the second arrives while the first runs
        await shadow.close()
        off = Shadow("m", "affine", unfused, rate=0.0, record=None)
        return first, second, pairs, off.offer(batch), engine.batches

    first, second, pairs, off, runs = asyncio.run(main())
    assert (first, second, off) == ("started", "skipped", "unsampled")
    assert len(pairs) == 1 and pairs[0][1] == 0.5 and pairs[0][0] > 0
    assert pairs[0][2] is not None and 0.0 <= pairs[0][2] <= 1.0
    assert runs == [2]


def test_shadow_skips_while_the_unfused_batcher_is_busy():
    async def main():
        engine = AffineEngine().load()
        unfused = Batcher(engine, max_batch_size=8, max_queue_delay_s=0.0)
        unfused._running = True  # as while it collects or runs a batch of its own
        shadow = Shadow("m", "affine", unfused, rate=1.0, record=lambda r, e, a: None)
        x = np.ones((1, 4), np.float32)
        result = shadow.offer(Batch({"x": x}, {"y": 2 * x + 1}, compute_s=0.001, rows=1))
        await shadow.close()
        return result, engine.batches

    assert asyncio.run(main()) == ("skipped", [])


class CountingStats(CompareStats):
    """Records which thread ran each bootstrap (a spy on the real computation, which still runs)."""

    def __init__(self):
        super().__init__(window=100)
        self.threads = []

    def bootstrap_ci(self, values, resamples=1000, seed=0):
        self.threads.append(threading.get_ident())
        return super().bootstrap_ci(values, resamples, seed)


def test_compare_bootstrap_runs_off_the_event_loop_and_is_cached_until_a_new_pair():
    async def main():
        stats = CountingStats()
        for r in np.linspace(0.8, 1.0, 21):
            stats.add_pair("m", "v", float(r), 0.0)
        loop_thread = threading.get_ident()
        first = await stats.summaries("m", ["v", "w"])
        again = await stats.summaries("m", ["v", "w"])
        runs_before_new_pair = len(stats.threads)
        stats.add_pair("m", "v", 0.9, 0.0)
        third = await stats.summaries("m", ["v"])
        return stats, loop_thread, first, again, third, runs_before_new_pair

    stats, loop_thread, first, again, third, before = asyncio.run(main())
    assert loop_thread not in stats.threads and stats.threads
    assert before == 2  # v and w once each; the second call reused both
    assert len(stats.threads) == 3
    assert first == again and first["v"]["shadow"]["ratio_ci95"] is not None
    assert third["v"]["shadow"]["pairs"] == 22
