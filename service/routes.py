"""OIP v2 REST routes, thin: parse, submit, encode. Errors become HTTP in service.errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from service.errors import (
    CLIENT_GONE,
    ERROR_RESPONSES,
    BodyTooLarge,
    ClientGone,
    ModelNotReady,
    NotLive,
    status_of,
)
from service.plans import parameters as plan_parameters
from service.protocol import (
    HEADER_LENGTH,
    InferenceResponse,
    ModelMetadata,
    ProtocolError,
    ServerMetadata,
    TensorMetadata,
    binary_choices,
    decode_request,
    decompress,
    encode_body,
    flag,
    priority_of,
    timeout_of,
)
from service.repository import Repository
from service.triton import EXTENSIONS, model_config, platform, repository_index, statistics

log = logging.getLogger(__name__)
router = APIRouter(responses=ERROR_RESPONSES)
JSON_PER_BYTE = 4  # about how many bytes of JSON text one byte of a float32 array becomes (~16 chars per value)


async def get_repo(request: Request) -> Repository:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop on every request
    return request.app.state.repo


Repo = Annotated[Repository, Depends(get_repo)]


# -- health and metadata -------------------------------------------------------------------------
@router.get("/v2/health/live")
async def live(repo: Repo) -> dict[str, bool]:
    hung = repo.hung()
    if hung:
        raise NotLive("an engine call has not come back; restart the server: " + "; ".join(hung))
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request, repo: Repo) -> dict[str, bool]:
    check_ready(request.app.state.ready, repo)
    return {"ready": True}


def check_ready(serving: bool, repo: Repository) -> None:
    """ModelNotReady (with the reason) unless the server is serving and some model is ready (REST and gRPC);
    in explicit mode a server with no model loaded is ready (models come by load requests)."""
    if not serving:
        raise ModelNotReady("the server is starting or shutting down")
    explicit_and_empty = repo.settings.model_control_mode == "explicit" and not repo.models
    if not explicit_and_empty and not any(entry.ready for entry in repo.models.values()):
        raise ModelNotReady("no model is ready: " + "; ".join(f"{n}: {e.reason}" for n, e in repo.models.items()))


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
        parameters={"variant": servable.variant, "exact": manifest.variants[servable.variant].exact,
                    **plan_parameters(manifest, servable.variant)},
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
async def index(request: Request, repo: Repo) -> list[dict[str, Any]]:
    return repository_index(repo, flag(await json_object(request), "ready", False, "ready"))


@router.post("/v2/repository/models/{model}/load")
async def load_model(model: str, request: Request, repo: Repo) -> dict:
    """Load `model`, or reload it (a zero-downtime swap): explicit mode (service.control)."""
    await repo.load(model, (await json_object(request)).get("parameters"))
    return {}


@router.post("/v2/repository/models/{model}/unload")
async def unload_model(model: str, request: Request, repo: Repo) -> dict:
    """Stop serving `model` once the requests it accepted are answered: explicit mode (service.control)."""
    await json_object(request)  # parameters.unload_dependents: normfuse models have no dependents
    await repo.unload(model)
    return {}


async def json_object(request: Request) -> dict[str, Any]:
    """A repository request's small JSON body, whatever its Content-Type (tritonclient sends none); empty = {}."""
    raw = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise ProtocolError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


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
        servable.users += 1  # a replaced revision drains only once no request holds it (service.control)
        servable.children.of(request.app.state.metrics.inflight).inc()
        settings = request.app.state.settings
        body = await read_body(request, settings.max_body_bytes)
        req, arrays = await off_loop(len(body) >= settings.offload_bytes, decode_request, body,
                                     request.headers.get(HEADER_LENGTH))
        rows = servable.check(arrays)
        binary = binary_choices(req, [spec.name for spec in servable.engine.outputs])
        work = servable.batcher.submit(arrays, timeout_of(req.parameters), priority_of(req.parameters))
        result = await until_disconnect(request, work)
        queue_s = result.queue_s
        out_bytes = sum(result.outputs[name].nbytes * (1 if binary[name] else JSON_PER_BYTE) for name in binary)
        content, headers = await off_loop(out_bytes >= settings.offload_bytes, encode, model, servable, req.id,
                                          result, binary)
        code = 200
        return Response(content, headers=headers)
    except (ClientGone, ClientDisconnect) as exc:
        log.debug("client went away (%s): %s", type(exc).__name__, request.url.path)
        return Response(status_code=CLIENT_GONE)
    except Exception as exc:
        code = status_of(exc)[0]
        raise
    finally:
        if servable is not None:
            servable.users -= 1
            record(request.app.state.metrics, servable, "http", code, time.perf_counter() - started, queue_s, rows)


async def off_loop(offload: bool, fn, *args):
    """fn(*args) on a worker thread when `offload` (a large body), else right here on the event loop."""
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)


def encode(model: str, servable, request_id: str | None, result, binary: dict[str, bool]) -> tuple[bytes, dict]:
    """The response body and headers: InferenceResponse(...).model_dump(exclude_none=True), built directly (same
    keys, same order), skipping the pydantic model on the hot path."""
    datatypes = {spec.name: spec.datatype for spec in servable.engine.outputs}
    response = {"model_name": model, "model_version": servable.variant}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [{"name": n, "shape": list(result.outputs[n].shape), "datatype": datatypes[n]}
                           for n in binary]
    content, headers = encode_body(response, result.outputs, binary)
    headers["x-queue-time"] = f"{result.queue_s * 1e3:.3f}"
    headers["x-compute-time"] = f"{result.compute_s * 1e3:.3f}"
    return content, headers


for _path in ("/v2/models/{model}/versions/{version}/infer", "/v2/models/{model}/infer"):  # as the decorators did
    router.add_api_route(_path, infer, methods=["POST"], openapi_extra=INFER_DOC,
                         responses={200: {"model": InferenceResponse}}, route_class_override=InferRoute)
# matched first: a request is tried against each route in turn, and inference is nearly all of the traffic
# (no other route's path can match /v2/models/{model}[/versions/{version}]/infer; app._openapi keeps the
# schema's path order)
router.routes.sort(key=lambda route: not isinstance(route, InferRoute))


def record(m, servable, protocol: str, code: int, seconds: float, queue_s: float | None, rows: int) -> None:
    """One answered (or abandoned) inference request, over `protocol` ("http" or "grpc"), in metrics and stats."""
    children = servable.children
    children.of(m.inflight).dec()
    children.of(m.requests, protocol, str(code)).inc()
    children.of(m.request, protocol).observe(seconds)
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

