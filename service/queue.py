"""The batcher's request queue: bounded, ordered by priority level, first-in first-out within a level.

Triton's schedule policy: a request's `priority` 1 is the highest level, 2 the next, and so on; 0 (or none)
means the default level, served after every explicit level. One consumer (the batcher's worker) takes requests;
`get` waits with `asyncio.wait`, which returns on timeout instead of raising, so no `TimeoutError` flavour (the
built-in from 3.11, `asyncio.TimeoutError` before) is ever caught.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Generic, TypeVar

T = TypeVar("T")
DEFAULT_LEVEL = 2**31  # after every explicit level (priority parameters are at most 2**31 - 1)


class QueueFull(Exception):
    """The queue is at `max_queue_size`: come back later (503 + Retry-After)."""


def level(priority: int) -> int:
    return priority if priority > 0 else DEFAULT_LEVEL


class RequestQueue(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._heap: list[tuple[int, int, T]] = []
        self._back = itertools.count()  # order of arrival
        self._front = itertools.count(-1, -1)  # put back: ahead of every arrival of its level
        self._waiter: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, item: T, priority: int = 0) -> None:
        """Enqueue at the back of its level, or raise QueueFull."""
        if len(self._heap) >= self.maxsize:
            raise QueueFull(f"queue is full ({self.maxsize} requests waiting)")
        self._push((level(priority), next(self._back), item))

    def put_back(self, item: T, priority: int = 0, *, first: bool = True) -> None:
        """Return an item taken but not (fully) used, never refused: first in its level (it did not fit the
        batch), or last (`first=False`: the rest of a large request, taking turns with the others)."""
        self._push((level(priority), next(self._front if first else self._back), item))

    def _push(self, entry: tuple[int, int, T]) -> None:
        heapq.heappush(self._heap, entry)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> T | None:
        return heapq.heappop(self._heap)[2] if self._heap else None

    async def get(self, timeout: float | None = None) -> T | None:
        """The next item; None if none arrives within `timeout` seconds (None = wait as long as it takes). An item
        removed between its arrival and our waking (its timeout passed at once) is waited past, not returned."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while not self._heap:
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return None
            self._waiter = loop.create_future()
            try:
                await asyncio.wait({self._waiter}, timeout=left)
            finally:
                self._waiter.cancel()
                self._waiter = None
        return self.get_nowait()

    def remove(self, item: T) -> bool:
        """Take `item` out (its caller left, or its timeout passed), freeing its place at once; False if absent."""
        for i, entry in enumerate(self._heap):
            if entry[2] is item:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def take_all(self) -> list[T]:
        items = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return items
