"""The server-wide limit on inference requests in flight.

A request takes a place once its whole message is in (service.inference: decoding, queueing, running, encoding),
for REST and gRPC alike, so a client that uploads slowly holds no place. Over the limit a request is answered
503 + Retry-After at once, never decoded. `InflightLimit` also refuses an HTTP request from its headers alone
while every place is taken, its body never read: under a flood the server spends its CPU on requests it will
answer.
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
    """`limit` requests in flight (`admit`), and `max_receiving` bytes of bodies being received (`receive`)."""

    def __init__(self, limit: int, on_reject: Callable[[], None] | None = None, max_receiving: int = 2**62) -> None:
        self.limit = limit
        self.current = 0
        self.on_reject = on_reject
        self.max_receiving = max_receiving
        self.receiving = 0

    def receive(self, nbytes: int) -> None:
        """Hold `nbytes` more of a body being received (`received` gives them back), or raise Overloaded."""
        if self.receiving + nbytes > self.max_receiving:
            if self.on_reject:
                self.on_reject()
            raise Overloaded(f"the server is receiving {self.receiving} bytes of request bodies, its limit is "
                             f"{self.max_receiving} (max_receiving_bytes); retry shortly")
        self.receiving += nbytes

    def received(self, nbytes: int) -> None:
        self.receiving -= nbytes

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
    """Pure ASGI middleware: a POST …/infer request arriving while `admission` is full is refused at once."""

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
        self.admission.leave()  # the place is taken for real once the body is in (service.inference)
        await self.app(scope, receive, send)
