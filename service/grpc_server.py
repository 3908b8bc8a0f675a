"""The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), beside REST in the same process.

grpcio's asyncio server runs on the app's event loop and answers from the same repository, batchers and metrics
as the REST routes, whose functions it calls for health and metadata; model control (RepositoryModelLoad/Unload,
explicit mode) calls the repository's load/unload as REST does (service.control); inference goes through the
same codec and validation (service.grpc_codec). Errors become gRPC status codes through service.errors (the same
table as HTTP). A client that cancels, or whose deadline passes, has its request dropped before compute. On
SIGTERM new calls are refused at once and accepted ones are answered (`GrpcServer.stop_accepting`, `stop`).

The service and messages are the generated ones shipped in `tritonclient[grpc]`; no .proto is kept here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import routes
from service.errors import CLIENT_GONE, ModelNotFound, ModelNotReady, NotLive, grpc_status_of, message_of
from service.grpc_codec import decode, encode, message, parameters
from service.protocol import binary_choices, priority_of, timeout_of
from service.restricted import grpc_interceptor
from service.triton import repository_index, statistics

log = logging.getLogger(__name__)


def answers(method):
    """A unary method whose domain errors become the gRPC status of the same HTTP error, with its message."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error is answered with a status; internal ones are logged
            _, code = grpc_status_of(exc)
            error = exc
        await context.abort(grpc.StatusCode[code], message_of(error))

    return wrapper


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 inference service over the app's state (repo, metrics, settings, ready)."""

    def __init__(self, state) -> None:
        self.state = state
        self.repo = state.repo
        self.offload_bytes = state.settings.offload_bytes  # messages this large are decoded/encoded off the loop

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request, context):
        try:
            await routes.live(self.repo)
        except NotLive:
            return pb.ServerLiveResponse(live=False)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        try:
            routes.check_ready(self.state.ready, self.repo)
        except ModelNotReady:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        try:
            await routes.model_ready(request.name, self.repo, request.version or None)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @answers
    async def ServerMetadata(self, request, context):
        return message((await routes.server_metadata()).model_dump(), pb.ServerMetadataResponse)

    @answers
    async def ModelMetadata(self, request, context):
        meta = await routes.model_metadata(request.name, self.repo, request.version or None)
        # KServe's ModelMetadataResponse has no parameters: `exact` reaches gRPC clients in ModelConfig's parameters
        return message(meta.model_dump(exclude={"parameters"}), pb.ModelMetadataResponse)

    @answers
    async def ModelConfig(self, request, context):
        config = await routes.config(request.name, self.repo, request.version or None)
        # the proto's version_policy holds integer versions; the variants are in ModelMetadata's versions
        config.pop("version_policy")
        return pb.ModelConfigResponse(config=message(config, mc.ModelConfig))

    @answers
    async def ModelStatistics(self, request, context):
        stats = statistics(self.repo, request.name or None, request.version or None)
        return message(stats, pb.ModelStatisticsResponse)

    @answers
    async def RepositoryIndex(self, request, context):
        return message({"models": repository_index(self.repo, request.ready)}, pb.RepositoryIndexResponse)

    @answers
    async def RepositoryModelLoad(self, request, context):
        """Load `model_name`, or reload it (a zero-downtime swap): explicit mode (service.control), as REST's."""
        await self.repo.load(request.model_name, parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @answers
    async def RepositoryModelUnload(self, request, context):
        """Stop serving `model_name` once its accepted requests are answered (unload_dependents: there are none)."""
        await self.repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        """Decode, validate, submit, encode: the REST route's steps, with its metrics under protocol="grpc"."""
        # the code recorded in metrics; stays 499 if the call is cancelled (the client left, or its deadline passed)
        started, code, queue_s, rows, servable = time.perf_counter(), CLIENT_GONE, None, 0, None
        try:
            servable = self.repo.get(request.model_name, request.model_version or None)
            servable.users += 1  # a replaced revision drains only once no request holds it (service.control)
            servable.children.of(self.state.metrics.inflight).inc()
            with self.state.admission.admit():  # the server-wide in-flight limit HTTP requests share
                req, arrays, wanted = await routes.off_loop(request.ByteSize() >= self.offload_bytes, _decode,
                                                            request, servable)
                rows = servable.check(arrays)
                result = await servable.batcher.submit(arrays, timeout_of(req.parameters), priority_of(req.parameters))
                queue_s = result.queue_s
                response = await routes.off_loop(_nbytes(result, wanted) >= self.offload_bytes, _encode,
                                                 request.model_name, servable, req.id, result, wanted)
            code = 200
            return response
        except Exception as exc:  # noqa: BLE001 - answered with the status of the same HTTP error
            code, name = grpc_status_of(exc)
            error = exc
        finally:
            if servable is not None:
                servable.users -= 1
                routes.record(self.state.metrics, servable, "grpc", code, time.perf_counter() - started, queue_s,
                              rows)
        await context.abort(grpc.StatusCode[name], message_of(error))


def _decode(request: pb.ModelInferRequest, servable):
    """(the codec's request, its arrays, the outputs asked for) of one inference call."""
    req, arrays = decode(request)
    return req, arrays, list(binary_choices(req, [spec.name for spec in servable.engine.outputs]))


def _nbytes(result, wanted: list[str]) -> int:
    return sum(result.outputs[name].nbytes for name in wanted)


def _encode(model: str, servable, request_id: str | None, result, wanted: list[str]) -> pb.ModelInferResponse:
    datatypes = {spec.name: spec.datatype for spec in servable.engine.outputs}
    return encode(model, servable.variant, request_id, {name: result.outputs[name] for name in wanted}, datatypes)


class GrpcServer:
    """The gRPC front end's lifecycle on the app's event loop: start after the models, stop before the drain."""

    def __init__(self, state) -> None:
        settings = state.settings
        self.host, self.port, self.grace_s = settings.host, settings.grpc_port, settings.drain_timeout_s
        interceptors = [grpc_interceptor(settings.restricted_api)] if settings.restricted_api else []
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),  # the REST body limit
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        ])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), self._server)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future | None = None

    async def start(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot listen on {address} ({exc}); pass --grpc-port (NORMFUSE_GRPC_PORT) "
                               "another port, or 0 for no gRPC") from None
        await self._server.start()
        self._loop = asyncio.get_running_loop()
        log.info("gRPC (OIP v2, inference.GRPCInferenceService) on %s", address)

    def stop_accepting(self) -> None:
        """From the SIGTERM handler: refuse new calls now; accepted ones are answered (up to the drain timeout)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(self.grace_s))

    async def stop(self) -> None:
        """Refuse new calls and wait until every accepted one is answered (cancelled past the drain timeout)."""
        if self._loop is None:
            return
        self._begin_stop()
        await self._stopping
