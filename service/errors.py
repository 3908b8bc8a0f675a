"""Domain errors -> HTTP status and gRPC code, in one table. Every HTTP error body is Triton's `{"error": "..."}`;
a gRPC call is aborted with the same message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engines.base import EngineError, InputError
from service.admission import RETRY_AFTER_S, Overloaded
from service.batcher import Draining, EngineUnavailable, QueueFull, QueueTimeout, TooManyRows
from service.protocol import ErrorBody, ProtocolError, SchemaError

log = logging.getLogger(__name__)
CLIENT_GONE = 499  # nginx's "client closed request": never seen by a client, only in metrics and logs


class ModelNotFound(LookupError):
    """No such model, or no such version (variant) of it."""


class ModelNotReady(RuntimeError):
    """The model exists but is not loaded (or the server is not ready yet)."""


class ModelControlError(ValueError):
    """A repository request that cannot be done: model control is off, the model is not loaded, its load failed."""


class BodyTooLarge(ValueError):
    """The request body exceeds `max_body_bytes` (or a control route's `max_control_body_bytes`)."""


class ResponseTooLarge(ValueError):
    """The answer would exceed `max_response_bytes` (or, as JSON, `max_json_response_bytes`): refused before compute."""


class BodyTimeout(TimeoutError):
    """The body did not arrive within `body_timeout_s`, or came slower than `min_upload_bytes_per_s` (408)."""


class Forbidden(PermissionError):
    """A restricted API called without its header and key (service.restricted)."""


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


class NotLive(RuntimeError):
    """An engine call has hung past engine_timeout_s + engine_recovery_s: restart the process."""


@dataclass(frozen=True)
class Status:
    http: int
    grpc: str  # grpc.StatusCode's name
    retry_after: bool = False  # 503s the client should simply retry: `Retry-After` over HTTP
    expected: bool = True  # the server's state or the client's doing: never logged as an error


# exception type -> its status under each protocol; the first match in order wins; anything else is 500 / INTERNAL
STATUS: list[tuple[type[BaseException], Status]] = [
    (ProtocolError, Status(400, "INVALID_ARGUMENT")),
    (InputError, Status(400, "INVALID_ARGUMENT")),
    (RecursionError, Status(400, "INVALID_ARGUMENT")),  # a body nested past what any decoder follows
    (SchemaError, Status(422, "INVALID_ARGUMENT")),
    (Forbidden, Status(403, "PERMISSION_DENIED")),
    (ModelNotFound, Status(404, "NOT_FOUND")),
    # a well-formed repository request that the server's state refuses (model control off, not loaded, load failed)
    (ModelControlError, Status(400, "FAILED_PRECONDITION")),
    (BodyTimeout, Status(408, "DEADLINE_EXCEEDED")),
    (BodyTooLarge, Status(413, "INVALID_ARGUMENT")),
    (TooManyRows, Status(413, "INVALID_ARGUMENT")),
    (ResponseTooLarge, Status(413, "RESOURCE_EXHAUSTED")),
    (ClientDisconnect, Status(CLIENT_GONE, "CANCELLED")),  # during the upload
    (ClientGone, Status(CLIENT_GONE, "CANCELLED")),  # while queued or running
    (QueueTimeout, Status(504, "DEADLINE_EXCEEDED")),  # the request's own `timeout` parameter, not the server's state
    (Overloaded, Status(503, "UNAVAILABLE", retry_after=True)),
    (QueueFull, Status(503, "UNAVAILABLE", retry_after=True)),
    (Draining, Status(503, "UNAVAILABLE", retry_after=True)),
    (EngineUnavailable, Status(503, "UNAVAILABLE", retry_after=True)),
    (ModelNotReady, Status(503, "UNAVAILABLE", retry_after=True)),
    (NotLive, Status(503, "UNAVAILABLE")),
    (EngineError, Status(500, "INTERNAL", expected=False)),
]
INTERNAL = Status(500, "INTERNAL", expected=False)

# what each route declares in the OpenAPI schema
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 403, 404, 408, 413, 422, 503, 504)}


def status(exc: BaseException) -> Status:
    """The row of `STATUS` for `exc`, logged once (a client gone at debug, an unexpected failure as an error)."""
    found = next((row for kind, row in STATUS if isinstance(exc, kind)), INTERNAL)
    if found.http == CLIENT_GONE:
        log.debug("client went away: %s", type(exc).__name__)
    elif not found.expected:
        log.error("internal error: %s", exc, exc_info=exc)
    return found


def status_of(exc: BaseException) -> tuple[int, dict[str, str]]:
    """(HTTP status, headers) of `exc`."""
    row = next((row for kind, row in STATUS if isinstance(exc, kind)), INTERNAL)
    return row.http, ({"Retry-After": RETRY_AFTER_S} if row.retry_after else {})


def message_of(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "the request is nested too deeply to be read"
    return str(exc) or type(exc).__name__


def error_response(exc: BaseException) -> JSONResponse:
    row = status(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if row.retry_after else {}
    if row.http == 408:  # the rest of a body that came too slowly is not worth reading: drop the connection
        headers["Connection"] = "close"
    return JSONResponse({"error": message_of(exc)}, status_code=row.http, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers: domain errors, FastAPI's validation errors, HTTP errors, anything else."""

    async def domain(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    async def http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    for kind, _row in STATUS:
        app.add_exception_handler(kind, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, domain)
