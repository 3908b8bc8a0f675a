"""The server-wide limit on inference requests in flight, checked before a request's body is read.

Each admitted request holds a place from its first byte to its last (reading, decoding, queueing, running,
encoding), so the memory held by requests is bounded by `max_inflight` bodies whatever the queues allow. Over
the limit a request is answered 503 + Retry-After at once, its body never read nor decoded: under a flood the
server spends its CPU on requests it will answer. `InflightLimit` applies it to HTTP; another front end (gRPC)
shares the same `Admission` through `app.state.admission`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

RETRY_AFTER_S = "1"


class Overloaded(Exception):
    """The server holds `max_inflight` requests already (503 + Retry-After)."""


class Admission:
    def __init__(self, limit: int, on_reject: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.current = 0
        self.on_reject = on_reject

    def try_enter(self) -> bool:
        """Take a place if one is free (then `leave()` once answered); False, counted, when none is."""
        if self.current >= self.limit:
            if self.on_reject:
                self.on_reject()
            return False
        self.current += 1
        return True

    def leave(self) -> None:
        self.current -= 1

    def refusal(self) -> Overloaded:
        return Overloaded(f"the server is at its limit of {self.limit} requests in flight; retry shortly")

    @contextmanager
    def admit(self):
        """Hold a place for the duration of the block, or raise Overloaded."""
        if not self.try_enter():
            raise self.refusal()
        try:
            yield
        finally:
            self.leave()


class InflightLimit:
    """Pure ASGI middleware: POST …/infer requests go through `admission` (found on the app's state)."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        if not self.admission.try_enter():
            # answered without reading the body: uvicorn discards the rest of it and keeps the connection
            response = JSONResponse({"error": str(self.admission.refusal())}, status_code=503,
                                    headers={"Retry-After": RETRY_AFTER_S})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()
