"""A tiny in-test Engine whose outputs are known exactly: y = 2x + 1, and it records every batch it ran."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from engines.base import Engine, EngineError, TensorSpec

POISON = -999.0  # a batch holding this value fails


class AffineEngine(Engine):
    backend = "fake"

    def __init__(self, features: int = 4, max_batch_size: int | None = 8, gate: threading.Event | None = None):
        super().__init__()
        self.features = features
        self.max_batch_size = max_batch_size
        self.gate = gate  # when set, each run waits for it: lets a test pile requests up in the queue
        self.batches: list[int] = []  # rows per run
        self.seen: list[float] = []  # every row's first value, in the order run
        self.entered = threading.Event()  # set once a run has started (and is maybe waiting on the gate)

    def load(self) -> AffineEngine:
        self._inputs = [TensorSpec("x", "FP32", (-1, self.features))]
        self._outputs = [TensorSpec("y", "FP32", (-1, self.features))]
        return self

    def _run(self, inputs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        self.seen.extend(float(v) for v in x[:, 0])
        if (x == POISON).any():
            raise EngineError("poisoned batch")
        return {"y": 2 * x + 1}


def rows(start: int, n: int, features: int = 4) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None].repeat(features, 1)


async def until(condition, timeout: float = 20.0, step: float = 0.005) -> None:
    """Wait (polling, not timing anything) until `condition()` holds; AssertionError after `timeout` seconds."""
    for _ in range(int(timeout / step)):
        if condition():
            return
        await asyncio.sleep(step)
    raise AssertionError("condition not reached")
