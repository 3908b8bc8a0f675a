"""What the batcher queues and hands back: the request errors, a queued request (`Pending`), the part of one a
batch runs (`Slice`), a request's answer (`Result`) and a finished batch for observers (`Batch`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


class TooManyRows(ValueError):
    """The request holds more rows than the whole queue can ever take (413): it could never run."""


class QueueTimeout(Exception):
    """The request's own timeout (its `timeout` parameter) passed before it could run (504)."""


class Draining(Exception):
    """The server is shutting down and accepts no new work."""


class EngineUnavailable(Exception):
    """The engine did not answer within `engine_timeout_s`, or has not come back since (503)."""


@dataclass
class Pending:
    """One request in the queue. A request larger than a batch holds one place and is run slice by slice
    (`taken` rows handed out so far); its slices' outputs are joined when the last one is back."""

    inputs: dict[str, np.ndarray]
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None = None
    priority: int = 0
    started_at: float | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    taken: int = 0
    parts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # start row -> outputs
    compute_s: float = 0.0
    largest_batch: int = 0

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def left(self) -> int:
        return self.rows - self.taken

    @property
    def key(self) -> tuple:
        """Requests can share a batch only when every non-batch dimension agrees."""
        return tuple((name, a.shape[1:]) for name, a in sorted(self.inputs.items()))


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one request, as one part of a batch."""

    pending: Pending
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        if self.start == 0 and self.stop == self.pending.rows:
            return self.pending.inputs
        return {k: v[self.start : self.stop] for k, v in self.pending.inputs.items()}

    def deliver(self, outputs: dict[str, np.ndarray], compute_s: float, batch_rows: int) -> None:
        """This slice's outputs; the request is answered once every slice is back."""
        p = self.pending
        if p.future.done():
            return
        p.parts[self.start] = outputs
        p.compute_s += compute_s
        p.largest_batch = max(p.largest_batch, batch_rows)
        if sum(next(iter(part.values())).shape[0] for part in p.parts.values()) < p.rows:
            return
        parts = [p.parts[start] for start in sorted(p.parts)]
        joined = parts[0] if len(parts) == 1 else {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        p.future.set_result(Result(joined, p.started_at - p.enqueued_at, p.compute_s, p.largest_batch))


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
