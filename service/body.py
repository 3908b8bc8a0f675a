"""Reading a REST request's body, bounded in bytes (413), in time (408: `body_timeout_s` for the whole body, and
after its first second at least `min_upload_bytes_per_s` on average) and by the bytes all bodies being received
hold together (`Admission.receiving`, 503); then decompressed. And the control routes' small JSON object."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from service.admission import Admission
from service.errors import BodyTimeout, BodyTooLarge
from service.protocol import ProtocolError, decompress

RATE_GRACE_S = 1.0  # a body's first second is not held to the minimum rate (connection set-up, a first chunk)


@dataclass(frozen=True)
class Pace:
    """How fast a body must come: all of it within `timeout_s`, and `rate` bytes/s on average after the grace."""

    timeout_s: float
    rate: int

    def wait_s(self, elapsed: float, received: int) -> float:
        """How long the next chunk may take to arrive, `elapsed` seconds and `received` bytes in."""
        deadline = self.timeout_s
        if self.rate:
            deadline = min(deadline, RATE_GRACE_S + received / self.rate)
        return deadline - elapsed

    def refusal(self, elapsed: float, received: int, declared: str) -> BodyTimeout:
        of = f" of {declared}" if declared else ""
        rate = f", at least {self.rate} bytes/s after its first second (min_upload_bytes_per_s)" if self.rate else ""
        return BodyTimeout(f"the request body came too slowly: {received}{of} bytes in {elapsed:.1f} s; the server "
                           f"takes a body within {self.timeout_s:g} s (body_timeout_s){rate}")


async def read_body(request: Request, limit: int, pace: Pace | None = None, admission: Admission | None = None
                    ) -> bytes:
    """The whole body, at most `limit` bytes before and after `Content-Encoding` (BodyTooLarge), coming at `pace`
    (BodyTimeout), its bytes held against `admission`'s receiving budget until it is in (Overloaded)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size, start = [], 0, time.monotonic()
    try:
        while True:
            wait_s = pace.wait_s(time.monotonic() - start, size) if pace else None
            if wait_s is not None and wait_s <= 0:
                raise pace.refusal(time.monotonic() - start, size, declared)
            try:
                message = await asyncio.wait_for(request.receive(), wait_s)
            except TimeoutError:
                raise pace.refusal(time.monotonic() - start, size, declared) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if admission is not None:
                admission.receive(len(chunk))
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    finally:
        if admission is not None:
            admission.received(size)
    try:
        return decompress(b"".join(chunks), request.headers.get("content-encoding", "").strip().lower(), limit)
    except OverflowError as exc:
        raise BodyTooLarge(str(exc)) from None


async def json_object(request: Request, limit: int, pace: Pace | None = None) -> dict[str, Any]:
    """A repository request's small JSON body, whatever its Content-Type (tritonclient sends none); empty = {}.
    `limit` is small (max_control_body_bytes), so parsing it on the event loop is brief."""
    raw = await read_body(request, limit, pace)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body
