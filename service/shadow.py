"""Fused vs unfused, live: shadow re-runs of sampled batches on `unfused`, and the numbers behind /compare.

A sampled batch of a variant is re-run on the unfused engine, on the unfused batcher's own one-thread executor
(which owns that engine, e.g. its CUDA context), after the variant's responses were sent: a shadow run starts
only while the unfused batcher is idle, at most one at a time per variant, and a sampled batch arriving
otherwise is skipped (counted). What that does and does not promise:

* the variant's own requests never wait for a shadow run (they run on the variant's executor);
* a shadow run *does* occupy the unfused executor: an `unfused` batch that becomes ready while a shadow run is
  in flight queues behind it on that executor, so unfused requests can be delayed by up to one shadow run (and
  with several variants shadowing, by several, one after another);
* on CPU every run shares the same cores, so shadow runs also slow concurrent batches of every variant a little.

Each shadow run records the paired ratio (variant compute time / unfused compute time on the same batch),
the max |Δ| of the outputs and the top-1 agreement (share of rows, or positions, whose last-axis argmax of the
first output equals unfused's): for a lossy variant (int8) the production error monitor.

A plan (service.plans: e.g. `affine-ov-bf16`, a variant on OpenVINO at a reduced precision, or an int8 OpenVINO
IR) is a version like any other and is shadowed the same way, against the fp32 ONNX Runtime `unfused`: its
ratio is then the engine-and-precision speed-up on live traffic, its agreement the live counterpart of the
gate it passed at conversion (the gate's record is in /compare's `accuracy`, the plan's engine and precision
beside it and in `normfuse_engine_info`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from oip.stats import bootstrap
from service.batcher import Batch, Batcher

log = logging.getLogger(__name__)
UNFUSED = "unfused"


@dataclass(frozen=True)
class Snapshot:
    """Copies of one variant's windows, taken on the event loop so they can be summarised on another thread."""

    key: tuple[str, str]
    latency: dict[int, list[float]]
    ratios: list[float]
    errors: list[float]
    added: int  # pairs ever added: identifies the ratio window's contents for the bootstrap cache
    agreements: list[float] = field(default_factory=list)  # top-1 agreements (only outputs with classes)


class CompareStats:
    """Bounded windows of recent compute times per (model, variant, batch size) and paired shadow ratios.

    The windows are written on the event loop; `summaries()` copies them there and computes off the loop (the
    bootstrap is 1000 resamples of up to `window` ratios), caching each variant's interval until a new pair
    arrives."""

    def __init__(self, window: int = 512, seed: int = 0) -> None:
        self.window = window
        self.seed = seed
        self.latency: dict[tuple[str, str], dict[int, deque[float]]] = defaultdict(dict)
        self.ratios: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.errors: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.agreements: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.added: dict[tuple[str, str], int] = defaultdict(int)
        self._ci: dict[tuple[str, str], tuple[int, list[float] | None]] = {}  # key -> (added, interval)

    def add_latency(self, model: str, variant: str, rows: int, seconds: float) -> None:
        self.latency[model, variant].setdefault(rows, deque(maxlen=self.window)).append(seconds)

    def add_pair(self, model: str, variant: str, ratio: float, abs_error: float, agreement: float | None = None) -> None:
        self.ratios[model, variant].append(ratio)
        self.errors[model, variant].append(abs_error)
        if agreement is not None:
            self.agreements[model, variant].append(agreement)
        self.added[model, variant] += 1

    def snapshot(self, model: str, variant: str) -> Snapshot:
        key = (model, variant)
        return Snapshot(key, {b: list(w) for b, w in self.latency.get(key, {}).items()},
                        list(self.ratios.get(key, ())), list(self.errors.get(key, ())), self.added.get(key, 0),
                        list(self.agreements.get(key, ())))

    async def summaries(self, model: str, variants: list[str]) -> dict[str, dict]:
        """`summary` of each variant, computed on a worker thread (never on the event loop)."""
        snaps = [self.snapshot(model, v) for v in variants]
        done = await asyncio.to_thread(lambda: [self.summarize(s) for s in snaps])
        return dict(zip(variants, done, strict=True))

    def summary(self, model: str, variant: str) -> dict:
        return self.summarize(self.snapshot(model, variant))

    def summarize(self, snap: Snapshot) -> dict:
        every = [s for window in snap.latency.values() for s in window]
        return {
            "compute_ms": {"all": _percentiles(every), **{str(b): _percentiles(w) for b, w in sorted(snap.latency.items())}},
            "shadow": {
                "pairs": len(snap.ratios),
                "ratio_median": float(np.median(snap.ratios)) if snap.ratios else None,
                "ratio_ci95": self._cached_ci(snap),
                "max_abs_error": max(snap.errors) if snap.errors else None,
                "agreement_mean": float(np.mean(snap.agreements)) if snap.agreements else None,
                "agreement_min": min(snap.agreements) if snap.agreements else None,
            },
        }

    def _cached_ci(self, snap: Snapshot) -> list[float] | None:
        cached = self._ci.get(snap.key)
        if cached is not None and cached[0] == snap.added:
            return cached[1]
        interval = self.bootstrap_ci(snap.ratios, seed=(self.seed, snap.added))
        self._ci[snap.key] = (snap.added, interval)
        return interval

    def bootstrap_ci(self, values: list[float], resamples: int = 1000, seed=0) -> list[float] | None:
        """95 % percentile-bootstrap interval of the median; None with fewer than 2 samples. A generator of its
        own per call (seeded), so concurrent calls on different threads are safe and repeatable."""
        if len(values) < 2:
            return None
        interval = bootstrap(np.median, values, paired=False, resamples=resamples, seed=seed)
        return [interval.low, interval.high]


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"n": len(seconds), "p50": float(p50), "p95": float(p95), "p99": float(p99)}


class Shadow:
    """Re-runs a sampled fraction of one variant's batches on the unfused engine, off the request path."""

    def __init__(self, model: str, variant: str, unfused: Batcher, rate: float, record, seed: int | None = None):
        self.model, self.variant, self.unfused, self.rate = model, variant, unfused, rate
        self.record = record  # record(ratio, abs_error, top1_agreement or None) on the event loop
        self.skipped = 0
        self._random = random.Random(seed)
        self._busy = False
        self._closed = False
        self._tasks: set[asyncio.Task] = set()

    def offer(self, batch: Batch) -> str:
        """Called after every served batch: "unsampled", "skipped" (unfused or a shadow run busy) or "started"."""
        if self._closed or self.rate <= 0 or self._random.random() >= self.rate:
            return "unsampled"
        if self._busy or self.unfused.busy:
            self.skipped += 1
            return "skipped"
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "started"

    async def _run(self, batch: Batch) -> None:
        try:
            outputs, seconds = await self.unfused.run_aside(batch.inputs)
            error = max(float(np.max(np.abs(batch.outputs[k].astype(np.float64) - outputs[k].astype(np.float64))))
                        for k in outputs)
            self.record(batch.compute_s / max(seconds, 1e-9), error, top1_agreement(batch.outputs, outputs))
        except Exception:  # a shadow failure must never touch serving
            log.exception("shadow run of %s/%s failed", self.model, self.variant)
        finally:
            self._busy = False

    async def close(self) -> None:
        """Offer nothing more; wait for the shadow run in progress (before the unfused batcher stops)."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def top1_agreement(served: dict[str, np.ndarray], unfused: dict[str, np.ndarray]) -> float | None:
    """Share of positions whose last-axis argmax of the first output agrees (None: one class or no output)."""
    name = next(iter(unfused), None)
    if name is None or unfused[name].ndim < 1 or unfused[name].shape[-1] < 2 or not unfused[name].size:
        return None
    return float(np.mean(np.argmax(served[name], -1) == np.argmax(unfused[name], -1)))
