"""The one thread that runs an engine: calls in order, off the event loop, owned for the engine's life.

A daemon thread rather than a `ThreadPoolExecutor`: the pool's threads are joined when the interpreter exits,
so one engine call that never returns would keep a stopping server alive forever. This thread is abandoned
instead, after the drain deadline (service.batcher). `busy_since` tells how long the current call has run.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Executor, Future


class EngineThread(Executor):
    def __init__(self, name: str = "engine") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._stopped = False
        self.busy_since: float | None = None  # time.perf_counter() when the running call started

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._stopped:
            raise RuntimeError("the engine thread has been shut down")
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            self.busy_since = time.perf_counter()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            finally:
                self.busy_since = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the calls already submitted; `wait` joins the thread (never done for a hung engine)."""
        self._stopped = True
        self._calls.put(None)
        if wait:
            self._thread.join()
