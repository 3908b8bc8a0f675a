"""The threads that run an engine: calls off the event loop, owned for the engine's life.

`EngineThread(name, threads=n)` runs up to `n` calls at once (the engine's `parallelism`: OpenVINO's infer
requests / streams); with one thread, calls run one at a time in order.

Daemon threads rather than a `ThreadPoolExecutor`: the pool's threads are joined when the interpreter exits,
so one engine call that never returns would keep a stopping server alive forever. These threads are abandoned
instead, after the drain deadline (service.batcher). `busy_since` tells how long the oldest running call has run.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Executor, Future


class EngineThread(Executor):
    def __init__(self, name: str = "engine", threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._started: dict[int, float] = {}  # thread ident -> time.perf_counter() when its running call started
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, name=name if threads == 1 else f"{name}-{i}",
                                          daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()
        self._stopped = False

    @property
    def busy_since(self) -> float | None:
        """When the oldest call still running started (None: every thread is idle)."""
        with self._lock:
            return min(self._started.values(), default=None)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._stopped:
            raise RuntimeError("the engine thread has been shut down")
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        me = threading.get_ident()
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._started[me] = time.perf_counter()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._started.pop(me, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the calls already submitted; `wait` joins the threads (never done for a hung engine)."""
        self._stopped = True
        for _ in self._threads:
            self._calls.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
