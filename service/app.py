"""The app factory and its lifespan: load the models (every one, or the `load_model` ones in explicit mode) ->
warm up -> start batchers -> start gRPC -> ready -> serve (and poll the repository in poll mode) -> not ready ->
stop gRPC (accepted calls answered) -> drain -> stop -> close."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import errors
from service.admission import Admission, InflightLimit
from service.control import ModelControl
from service.inference import Inference
from service.metrics import Metrics
from service.protocol import InferenceRequest
from service.repository import Loader, Repository
from service.restricted import RestrictedApi
from service.routes import router
from service.settings import Settings

log = logging.getLogger(__name__)


def default_loader(*args, **kwargs):
    import engines  # lazily: engines imports the chosen backend only when loading

    return engines.load(*args, **kwargs)


def create_app(settings: Settings, loader: Loader | None = None) -> FastAPI:
    """Build the server. `loader(repo, model, variant, backend, **options)` opens one engine (engines.load)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repo, control, poller = app.state.repo, app.state.control, None
        try:
            await control.start_up()
            if settings.grpc_port:
                from service.grpc_server import GrpcServer  # grpcio only when gRPC is on

                app.state.grpc = GrpcServer(app.state)
                await app.state.grpc.start()
            # everything imported and loaded so far (torch, transformers, engines) lives as long as the server:
            # left to the collector, each full collection walks it all (~100 ms with `normfuse serve`), a stall
            # every few thousand requests. Frozen, a full collection walks only what serving allocates.
            gc.collect()
            gc.freeze()
            app.state.ready = True
            log.info("ready: %d model(s) from %s", len(repo.models), settings.repo)
            if settings.model_control_mode == "poll":  # swaps in re-converted models (service.control)
                poller = asyncio.get_running_loop().create_task(control.poll(settings.repository_poll_secs))
            yield
        finally:
            app.state.ready = False
            if poller is not None:
                poller.cancel()  # a revision being built is dropped; one already swapped in drains below
            log.info("draining")
            if app.state.grpc is not None:  # refuse new calls; the accepted ones are answered by the batchers
                await app.state.grpc.stop()
            await control.drain(settings.drain_timeout_s)
            repo.close()
            gc.unfreeze()
            log.info("stopped")

    app = FastAPI(title="normfuse", summary="Open Inference Protocol v2 server for fused and unfused variants",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.repo = Repository(settings, app.state.metrics, loader or default_loader)
    app.state.control = ModelControl(app.state.repo)
    app.state.ready = False
    app.state.grpc = None  # service.grpc_server.GrpcServer while serving gRPC
    app.state.admission = Admission(settings.max_inflight, on_reject=app.state.metrics.refused.inc,
                                    max_receiving=settings.max_receiving_bytes)
    app.state.inference = Inference(settings, app.state.repo, app.state.admission, app.state.metrics)
    app.add_middleware(InflightLimit, admission=app.state.admission)
    if settings.restricted_api:  # outermost: a refused request takes no in-flight place and is not read
        app.add_middleware(RestrictedApi, restrictions=settings.restricted_api)
    errors.install(app)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the inference request body, which the route reads raw (JSON or binary)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version="2", summary=app.summary, routes=app.routes)
        # the inference routes are matched first (service.routes) but listed last, as they are declared
        schema["paths"] = dict(sorted(schema["paths"].items(), key=lambda item: item[0].endswith("/infer")))
        request = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["InferenceRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema
