"""Reading a REST request's body: bounded in bytes (413) and decompressed; the control routes' small JSON object."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from service.errors import BodyTooLarge
from service.protocol import ProtocolError, decompress


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes before and after `Content-Encoding` (BodyTooLarge)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return decompress(b"".join(chunks), request.headers.get("content-encoding", "").strip().lower(), limit)
    except OverflowError as exc:
        raise BodyTooLarge(str(exc)) from None


async def json_object(request: Request, limit: int) -> dict[str, Any]:
    """A repository request's small JSON body, whatever its Content-Type (tritonclient sends none); empty = {}."""
    raw = await read_body(request, limit)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body
