"""OIP v2 REST routes, thin: parse, submit, encode. Errors become HTTP in service.errors."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engines.base import check_inputs
from service.errors import ERROR_RESPONSES, BodyTooLarge, ModelNotReady, status_of
from service.protocol import (
    HEADER_LENGTH,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    binary_choices,
    decode_request,
    decompress,
    encode_body,
    flag,
    timeout_of,
)
from service.repository import Repository
from service.triton import EXTENSIONS, model_config, platform, repository_index, statistics

router = APIRouter(responses=ERROR_RESPONSES)
CLIENT_GONE = 499  # nginx's "client closed request": never seen by a client, only in metrics


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


async def get_repo(request: Request) -> Repository:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop on every request
    return request.app.state.repo


Repo = Annotated[Repository, Depends(get_repo)]


# -- health and metadata -------------------------------------------------------------------------
@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request, repo: Repo) -> dict[str, bool]:
    state = request.app.state
    if not state.ready:
        raise ModelNotReady("the server is starting or shutting down")
    if not any(entry.ready for entry in repo.models.values()):
        raise ModelNotReady("no model is ready: " + "; ".join(f"{n}: {e.reason}" for n, e in repo.models.items()))
    return {"ready": True}


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    try:
        release = package_version("normfuse")
    except PackageNotFoundError:
        release = "unknown"
    return ServerMetadata(name="normfuse", version=release, extensions=EXTENSIONS)


@router.get("/v2/models/stats")
@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def stats(repo: Repo, model: str | None = None, version: str | None = None) -> dict[str, Any]:
    return statistics(repo, model, version)


@router.get("/v2/models/{model}", response_model=ModelMetadata)
@router.get("/v2/models/{model}/versions/{version}", response_model=ModelMetadata)
async def model_metadata(model: str, repo: Repo, version: str | None = None) -> ModelMetadata:
    servable = repo.get(model, version)
    manifest = repo.entry(model).manifest
    return ModelMetadata(
        name=model,
        versions=manifest.servable(),
        platform=platform(servable.labels["backend"]),
        inputs=[TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in servable.engine.inputs],
        outputs=[TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in servable.engine.outputs],
        parameters={"variant": servable.variant, "exact": manifest.variants[servable.variant].exact},
    )


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(model: str, repo: Repo, version: str | None = None) -> dict[str, Any]:
    entry = repo.entry(model)
    if version is None and not entry.ready:
        raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
    repo.get(model, version)  # 404 for an unknown version, 503 with the reason for a failed one
    return {"name": model, "ready": True}


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def config(model: str, repo: Repo, version: str | None = None) -> dict[str, Any]:
    return model_config(repo, repo.entry(model), version)


@router.post("/v2/repository/index")
async def index(repo: Repo, body: Annotated[dict[str, Any] | None, Body()] = None) -> list[dict[str, Any]]:
    return repository_index(repo, flag(body or {}, "ready", False, "ready"))


@router.get("/v2/models/{model}/compare")
async def compare(model: str, repo: Repo) -> dict[str, Any]:
    """Per variant: p50/p95/p99 compute latency (all and per batch size), paired shadow ratio, parity."""
    entry = repo.entry(model)
    if entry.manifest is None:
        raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
    names = entry.manifest.servable()
    summaries = await repo.compare.summaries(model, names)  # the bootstrap runs off the event loop
    variants = {}
    for name in names:
        info = entry.manifest.variants[name]
        variants[name] = {
            "ready": name in entry.variants,
            "exact": info.exact,
            **summaries[name],
            "parity": [p.model_dump() for p in info.parity],
            "accuracy": info.accuracy.model_dump() if info.accuracy else None,  # lossy variants: the gate's record
        }
    return {"model": model, "baseline": "unfused", "default_variant": entry.default,
            "variants": variants}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- inference -----------------------------------------------------------------------------------
INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}}


class InferRoute(APIRoute):
    """The inference route reads the raw request itself and returns a ready Response, so it skips FastAPI's
    per-request dependency solving and response handling; its signature still documents it in the schema."""

    def get_route_handler(self):
        async def handler(request: Request) -> Response:
            params = request.path_params
            return await infer(params["model"], request, request.app.state.repo, params.get("version"))

        return handler


async def infer(model: str, request: Request, repo: Repo, version: str | None = None) -> Response:
    # the code recorded in metrics; stays 499 if this handler is cancelled (the client went away)
    started, code, queue_s, rows, servable = time.perf_counter(), CLIENT_GONE, None, 0, None
    try:
        servable = repo.get(model, version)
        servable.children.of(request.app.state.metrics.inflight).inc()
        body = await read_body(request, request.app.state.settings.max_body_bytes)
        req, arrays = decode_request(body, request.headers.get(HEADER_LENGTH))
        check_inputs(servable.engine.inputs, arrays)
        rows = next(iter(arrays.values())).shape[0]
        binary = binary_choices(req, [spec.name for spec in servable.engine.outputs])
        result = await until_disconnect(request, servable.batcher.submit(arrays, timeout_of(req.parameters)))
        queue_s = result.queue_s
        datatypes = {spec.name: spec.datatype for spec in servable.engine.outputs}
        # InferenceResponse(...).model_dump(exclude_none=True), built directly (same keys, same order)
        response = {"model_name": model, "model_version": servable.variant}
        if req.id is not None:
            response["id"] = req.id
        response["outputs"] = [{"name": n, "shape": list(result.outputs[n].shape), "datatype": datatypes[n]}
                               for n in binary]
        content, headers = encode_body(response, result.outputs, binary)
        headers["x-queue-time"] = f"{result.queue_s * 1e3:.3f}"
        headers["x-compute-time"] = f"{result.compute_s * 1e3:.3f}"
        code = 200
        return Response(content, headers=headers)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    except Exception as exc:
        code = status_of(exc)[0]
        raise
    finally:
        if servable is not None:
            record(request, servable, code, time.perf_counter() - started, queue_s, rows)


for _path in ("/v2/models/{model}/versions/{version}/infer", "/v2/models/{model}/infer"):  # as the decorators did
    router.add_api_route(_path, infer, methods=["POST"], openapi_extra=INFER_DOC,
                         responses={200: {"model": InferenceResponse}}, route_class_override=InferRoute)
# matched first: a request is tried against each route in turn, and inference is nearly all of the traffic
# (no other route's path can match /v2/models/{model}[/versions/{version}]/infer; app._openapi keeps the
# schema's path order)
router.routes.sort(key=lambda route: not isinstance(route, InferRoute))


def record(request: Request, servable, code: int, seconds: float, queue_s: float | None, rows: int) -> None:
    m, children = request.app.state.metrics, servable.children
    children.of(m.inflight).dec()
    children.of(m.requests, str(code)).inc()
    children.of(m.request).observe(seconds)
    if queue_s is not None:
        children.of(m.queue).observe(queue_s)
    servable.stats.record_request(code == 200, seconds, queue_s, rows)


async def read_body(request: Request, limit: int) -> bytes:
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

