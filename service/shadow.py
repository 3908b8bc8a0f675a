"""Fused vs unfused, live: shadow re-runs of sampled batches on `unfused`, and the numbers behind /compare.

A sampled batch of a variant is re-run on the unfused engine, on the unfused batcher's own engine thread (which
owns that engine, e.g. its CUDA context), off the request path: only while the unfused batcher is idle, at
most one shadow run at a time per variant, and a sampled batch arriving otherwise is skipped (counted), so
shadowing never queues work or delays the variant's responses. Each shadow run records the paired
ratio (variant compute time / unfused compute time on the same batch) and the max |Δ| of the outputs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict, deque

import numpy as np

from service.batcher import Batch, Batcher

log = logging.getLogger(__name__)
UNFUSED = "unfused"


class CompareStats:
    """Bounded windows of recent compute times per (model, variant, batch size) and paired shadow ratios."""

    def __init__(self, window: int = 512, seed: int = 0) -> None:
        self.window = window
        self.latency: dict[tuple[str, str], dict[int, deque[float]]] = defaultdict(dict)
        self.ratios: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.errors: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.rng = np.random.default_rng(seed)

    def add_latency(self, model: str, variant: str, rows: int, seconds: float) -> None:
        self.latency[model, variant].setdefault(rows, deque(maxlen=self.window)).append(seconds)

    def add_pair(self, model: str, variant: str, ratio: float, abs_error: float) -> None:
        self.ratios[model, variant].append(ratio)
        self.errors[model, variant].append(abs_error)

    def summary(self, model: str, variant: str) -> dict:
        per_batch = self.latency.get((model, variant), {})
        every = [s for window in per_batch.values() for s in window]
        ratios = list(self.ratios.get((model, variant), ()))
        errors = list(self.errors.get((model, variant), ()))
        return {
            "compute_ms": {"all": _percentiles(every), **{str(b): _percentiles(list(w)) for b, w in sorted(per_batch.items())}},
            "shadow": {
                "pairs": len(ratios),
                "ratio_median": float(np.median(ratios)) if ratios else None,
                "ratio_ci95": self.bootstrap_ci(ratios),
                "max_abs_error": max(errors) if errors else None,
            },
        }

    def bootstrap_ci(self, values: list[float], resamples: int = 1000) -> list[float] | None:
        """95 % percentile-bootstrap interval of the median; None with fewer than 2 samples."""
        if len(values) < 2:
            return None
        data = np.asarray(values)
        medians = np.median(self.rng.choice(data, size=(resamples, len(data)), replace=True), axis=1)
        return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"n": len(seconds), "p50": float(p50), "p95": float(p95), "p99": float(p99)}


class Shadow:
    """Re-runs a sampled fraction of one variant's batches on the unfused engine, off the request path."""

    def __init__(self, model: str, variant: str, unfused: Batcher, rate: float, record, seed: int | None = None):
        self.model, self.variant, self.unfused, self.rate = model, variant, unfused, rate
        self.record = record  # record(ratio, abs_error) on the event loop
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
            self.record(batch.compute_s / max(seconds, 1e-9), error)
        except Exception:  # a shadow failure must never touch serving
            log.exception("shadow run of %s/%s failed", self.model, self.variant)
        finally:
            self._busy = False

    async def close(self) -> None:
        """Offer nothing more; wait for the shadow run in progress (before the unfused batcher stops)."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
