"""Domain errors -> HTTP, in one place. Every error body is Triton's `{"error": "message"}`."""

from __future__ import annotations

import logging

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
    """The request body exceeds `max_body_bytes`."""


class Forbidden(PermissionError):
    """A restricted API called without its header and key (service.restricted)."""


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


class NotLive(RuntimeError):
    """An engine call has hung past engine_timeout_s + engine_recovery_s: restart the process."""


# exception type -> (status, headers); the first match in order wins
STATUS: list[tuple[type[BaseException], int, dict[str, str]]] = [
    (ProtocolError, 400, {}),
    (InputError, 400, {}),
    (SchemaError, 422, {}),
    (Forbidden, 403, {}),
    (ModelNotFound, 404, {}),
    (ModelControlError, 400, {}),
    (BodyTooLarge, 413, {}),
    (TooManyRows, 413, {}),
    (ClientDisconnect, CLIENT_GONE, {}),  # during the upload
    (ClientGone, CLIENT_GONE, {}),  # while queued or running
    (QueueTimeout, 504, {}),  # the request's own `timeout` parameter, not the server's state
    (Overloaded, 503, {"Retry-After": RETRY_AFTER_S}),
    (QueueFull, 503, {"Retry-After": RETRY_AFTER_S}),
    (Draining, 503, {"Retry-After": RETRY_AFTER_S}),
    (EngineUnavailable, 503, {"Retry-After": RETRY_AFTER_S}),
    (ModelNotReady, 503, {"Retry-After": RETRY_AFTER_S}),
    (NotLive, 503, {}),
    (EngineError, 500, {}),
]
EXPECTED = (ClientDisconnect, ClientGone, QueueTimeout, Overloaded, QueueFull, Draining, EngineUnavailable,
            ModelNotReady, NotLive)  # the server's state or the client's doing: never logged as an error

# HTTP status -> the gRPC status code (grpc.StatusCode's name) of the same error, for service.grpc_server;
# any other status is INTERNAL.
GRPC_CODES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
              499: "CANCELLED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# ... except these, whose gRPC code says more than their HTTP status: a well-formed repository request that the
# server's state refuses (model control off, the model not loaded, its load failed) is FAILED_PRECONDITION
GRPC_CODE_OF_KIND: list[tuple[type[BaseException], str]] = [(ModelControlError, "FAILED_PRECONDITION")]

# what each route declares in the OpenAPI schema
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 403, 404, 413, 422, 503, 504)}


def status_of(exc: BaseException) -> tuple[int, dict[str, str]]:
    for kind, status, headers in STATUS:
        if isinstance(exc, kind):
            return status, headers
    return 500, {}


def grpc_status_of(exc: BaseException) -> tuple[int, str]:
    """(the HTTP status recorded in metrics, the gRPC status code's name) for `exc`, logged as HTTP logs it."""
    status = status_of(exc)[0]
    _log(status, exc)
    code = next((code for kind, code in GRPC_CODE_OF_KIND if isinstance(exc, kind)), None)
    return status, code or GRPC_CODES.get(status, "INTERNAL")


def _log(status: int, exc: BaseException) -> None:
    if isinstance(exc, ClientDisconnect | ClientGone):
        log.debug("client went away: %s", type(exc).__name__)
    elif status >= 500 and not isinstance(exc, EXPECTED):
        log.error("internal error: %s", exc, exc_info=exc)


def message_of(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def error_response(exc: BaseException) -> JSONResponse:
    status, headers = status_of(exc)
    _log(status, exc)
    return JSONResponse({"error": message_of(exc)}, status_code=status, headers=headers)


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

    for kind, _status, _headers in STATUS:
        app.add_exception_handler(kind, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, domain)
