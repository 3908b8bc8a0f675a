"""OIP v2 REST routes, thin: each translates HTTP into a call of service.info, service.control or the one
inference call (service.inference), and its answer back; errors become HTTP in service.errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from service import info
from service.body import json_object as _json_object
from service.body import read_body
from service.control import ModelControl
from service.errors import CLIENT_GONE, ERROR_RESPONSES, ClientGone, ModelNotReady
from service.inference import Answer
from service.metrics import engine_info
from service.protocol import (
    HEADER_LENGTH,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
    encode_body,
    flag,
    read_request,
    request_arrays,
)
from service.repository import Repository

log = logging.getLogger(__name__)
router = APIRouter(responses=ERROR_RESPONSES)


async def get_repo(request: Request) -> Repository:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop on every request
    return request.app.state.repo


async def get_control(request: Request) -> ModelControl:
    return request.app.state.control


Repo = Annotated[Repository, Depends(get_repo)]
Control = Annotated[ModelControl, Depends(get_control)]


# -- health and metadata -------------------------------------------------------------------------
@router.get("/v2/health/live")
async def live(repo: Repo) -> dict[str, bool]:
    info.check_live(repo)
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request, repo: Repo) -> dict[str, bool]:
    info.check_ready(request.app.state.ready, repo)
    return {"ready": True}


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return info.server_metadata()


@router.get("/v2/models/stats")
@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def stats(repo: Repo, model: str | None = None, version: str | None = None) -> dict[str, Any]:
    return info.statistics(repo, model, version)


@router.get("/v2/models/{model}", response_model=ModelMetadata)
@router.get("/v2/models/{model}/versions/{version}", response_model=ModelMetadata)
async def model_metadata(model: str, repo: Repo, version: str | None = None) -> ModelMetadata:
    return info.model_metadata(repo, model, version)


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(model: str, repo: Repo, version: str | None = None) -> dict[str, Any]:
    info.check_model_ready(repo, model, version)
    return {"name": model, "ready": True}


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def config(model: str, repo: Repo, version: str | None = None) -> dict[str, Any]:
    return info.config(repo, model, version)


@router.post("/v2/repository/index")
async def index(request: Request, control: Control) -> list[dict[str, Any]]:
    body = await json_object(request)
    return info.repository_index(control, flag(body, "ready", False, "ready"))


@router.post("/v2/repository/models/{model}/load")
async def load_model(model: str, request: Request, control: Control) -> dict:
    """Load `model`, or reload it (a zero-downtime swap): explicit mode (service.control)."""
    body = await json_object(request)
    await control.load(model, body.get("parameters"))
    return {}


@router.post("/v2/repository/models/{model}/unload")
async def unload_model(model: str, request: Request, control: Control) -> dict:
    """Stop serving `model` once the requests it accepted are answered: explicit mode (service.control)."""
    await json_object(request)  # unload_dependents: there are none
    await control.unload(model)
    return {}


@router.get("/v2/models/{model}/compare")
async def compare(model: str, repo: Repo) -> dict[str, Any]:
    """Per variant: its engine and precision, p50/p95/p99 compute latency (all and per batch size), paired shadow
    ratio, error and top-1 agreement against unfused, parity."""
    entry = repo.entry(model)
    if entry.manifest is None:
        raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
    names = entry.manifest.servable()
    summaries = await repo.compare.summaries(model, names)  # the bootstrap runs off the event loop
    variants = {}
    for name in names:
        record, served = entry.manifest.variants[name], entry.variants.get(name)
        described = (engine_info(served.engine.describe(), entry.manifest, name, entry.label,
                                 default=name == entry.default) if served else {})
        variants[name] = {
            "ready": served is not None,
            "exact": record.exact,
            "engine": described.get("runtime"), "precision": described.get("precision"),  # None: not loaded
            **summaries[name],
            "parity": [p.model_dump() for p in record.parity],
            "accuracy": record.accuracy.model_dump() if record.accuracy else None,  # lossy variants: the gate's record
        }
    return {"model": model, "baseline": "unfused", "default_variant": entry.default,
            "variants": variants}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- inference -----------------------------------------------------------------------------------
INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}}


async def json_object(request: Request) -> dict[str, Any]:
    """A control route's small JSON body (at most max_control_body_bytes, read at the inference bodies' pace)."""
    state = request.app.state
    return await _json_object(request, state.settings.max_control_body_bytes, state.inference.pace)


class InferRoute(APIRoute):
    """The inference route reads the raw request itself and returns a ready Response, so it skips FastAPI's
    per-request dependency solving and response handling; its signature still documents it in the schema."""

    def get_route_handler(self):
        async def handler(request: Request) -> Response:
            params = request.path_params
            return await infer(params["model"], request, params.get("version"))

        return handler


class RestMessage:
    """An inference request body (JSON, or JSON + binary tensors) for service.inference."""

    protocol, binary_only = "http", False

    def __init__(self, request: Request) -> None:
        self.request, self.header_length = request, request.headers.get(HEADER_LENGTH)
        self.body, self.size, self._blob = b"", 0, memoryview(b"")

    async def receive(self) -> None:
        state = self.request.app.state
        self.body = await read_body(self.request, state.settings.max_body_bytes, state.inference.pace, state.admission)
        self.size = len(self.body)

    def header(self) -> InferenceRequest:
        request, self._blob = read_request(self.body, self.header_length)
        return request

    def tensors(self, request: InferenceRequest):
        return request_arrays(request, self._blob)

    def encode(self, answer: Answer) -> tuple[bytes, dict[str, str]]:
        """The response body and headers: InferenceResponse(...).model_dump(exclude_none=True), built directly
        (same keys, same order), skipping the pydantic model on the hot path."""
        result, datatypes = answer.result, answer.datatypes
        response = {"model_name": answer.model, "model_version": answer.servable.variant}
        if answer.request_id is not None:
            response["id"] = answer.request_id
        response["outputs"] = [{"name": n, "shape": list(result.outputs[n].shape), "datatype": datatypes[n]}
                               for n in answer.outputs]
        content, headers = encode_body(response, result.outputs, answer.outputs)
        headers["x-queue-time"] = f"{result.queue_s * 1e3:.3f}"
        headers["x-compute-time"] = f"{result.compute_s * 1e3:.3f}"
        return content, headers


async def infer(model: str, request: Request, version: str | None = None) -> Response:
    state = request.app.state
    try:
        wait = lambda work: until_disconnect(request, work)  # noqa: E731
        content, headers = await state.inference(model, version, RestMessage(request), wait)
        return Response(content, headers=headers)
    except (ClientGone, ClientDisconnect) as exc:
        log.debug("client went away (%s): %s", type(exc).__name__, request.url.path)
        return Response(status_code=CLIENT_GONE)


for _path in ("/v2/models/{model}/versions/{version}/infer", "/v2/models/{model}/infer"):  # as the decorators did
    router.add_api_route(_path, infer, methods=["POST"], openapi_extra=INFER_DOC,
                         responses={200: {"model": InferenceResponse}}, route_class_override=InferRoute)
# matched first: a request is tried against each route in turn, and inference is nearly all of the traffic
# (no other route's path can match /v2/models/{model}[/versions/{version}]/infer; app._openapi keeps the
# schema's path order)
router.routes.sort(key=lambda route: not isinstance(route, InferRoute))


async def until_disconnect(request: Request, work):
    """Await `work`, cancelling it (so the batcher drops it before compute) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

