"""The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), beside REST in the same process.

grpcio's asyncio server runs on the app's event loop. Each method is an adapter over what REST calls too: health,
metadata, configuration, statistics and the index are service.info's functions, model control
(RepositoryModelLoad/Unload, explicit mode) is service.control's, and ModelInfer is the one inference call
(service.inference) over a `GrpcMessage` (service.grpc_codec reads it with the REST codec's checks). Errors become
gRPC status codes through service.errors (the same table as HTTP), bytes that are no protobuf message too
(INVALID_ARGUMENT: each method reads its own request, `method_handlers`). A client that cancels, or whose deadline
passes, has its request dropped before compute. On SIGTERM new calls are refused at once and accepted ones are
answered (`GrpcServer.stop_accepting`, `stop`).

The service and messages are the generated ones shipped in `tritonclient[grpc]`; no .proto is kept here.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import info
from service.errors import ModelNotFound, ModelNotReady, NotLive, message_of, status
from service.grpc_codec import encode, message, parameters, read
from service.inference import Answer
from service.protocol import ProtocolError, request_arrays
from service.restricted import grpc_interceptor

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]  # inference.GRPCInferenceService


def answers(method):
    """A unary method whose domain errors become the gRPC status of the same HTTP error, with its message."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error is answered with a status; internal ones are logged
            code, error = status(exc).grpc, exc
        await context.abort(grpc.StatusCode[code], message_of(error))

    return wrapper


class GrpcMessage:
    """A ModelInferRequest for service.inference: already received whole; every output answered raw."""

    protocol, binary_only = "grpc", True

    def __init__(self, request: pb.ModelInferRequest) -> None:
        self.request, self.size, self._blob = request, request.ByteSize(), memoryview(b"")

    async def receive(self) -> None:
        pass

    def header(self):
        header, self._blob = read(self.request)
        return header

    def tensors(self, header):
        return request_arrays(header, self._blob)

    def encode(self, answer: Answer) -> pb.ModelInferResponse:
        outputs = {name: answer.result.outputs[name] for name in answer.outputs}
        return encode(answer.model, answer.servable.variant, answer.request_id, outputs, answer.datatypes)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 inference service over the app's state (repo, control, inference, ready)."""

    def __init__(self, state) -> None:
        self.state = state
        self.repo = state.repo

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request, context):
        try:
            info.check_live(self.repo)
        except NotLive:
            return pb.ServerLiveResponse(live=False)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        try:
            info.check_ready(self.state.ready, self.repo)
        except ModelNotReady:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        try:
            info.check_model_ready(self.repo, request.name, request.version or None)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @answers
    async def ServerMetadata(self, request, context):
        return message(info.server_metadata().model_dump(), pb.ServerMetadataResponse)

    @answers
    async def ModelMetadata(self, request, context):
        meta = info.model_metadata(self.repo, request.name, request.version or None)
        # KServe's ModelMetadataResponse has no parameters: `exact` reaches gRPC clients in ModelConfig's parameters
        return message(meta.model_dump(exclude={"parameters"}), pb.ModelMetadataResponse)

    @answers
    async def ModelConfig(self, request, context):
        config = info.config(self.repo, request.name, request.version or None)
        # the proto's version_policy holds integer versions; the variants are in ModelMetadata's versions
        config.pop("version_policy")
        return pb.ModelConfigResponse(config=message(config, mc.ModelConfig))

    @answers
    async def ModelStatistics(self, request, context):
        stats = info.statistics(self.repo, request.name or None, request.version or None)
        return message(stats, pb.ModelStatisticsResponse)

    @answers
    async def RepositoryIndex(self, request, context):
        rows = info.repository_index(self.state.control, request.ready)
        return message({"models": rows}, pb.RepositoryIndexResponse)

    @answers
    async def RepositoryModelLoad(self, request, context):
        """Load `model_name`, or reload it (a zero-downtime swap): explicit mode (service.control), as REST's."""
        await self.state.control.load(request.model_name, parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @answers
    async def RepositoryModelUnload(self, request, context):
        """Stop serving `model_name` once its accepted requests are answered (unload_dependents: there are none)."""
        await self.state.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------
    @answers
    async def ModelInfer(self, request, context):
        """The one inference call (service.inference), its metrics under protocol="grpc"; a cancelled call (the
        client left, or its deadline passed) is dropped before compute."""
        return await self.state.inference(request.model_name, request.model_version or None, GrpcMessage(request))


def parsed(method, kind):
    """`method` taking the request's raw bytes: grpcio answers a request that its deserializer cannot read with
    UNKNOWN ("Unexpected DecodeError"), so each method reads its own, and bytes that are no `kind` message are a
    ProtocolError answered through service.errors like any bad request (INVALID_ARGUMENT)."""

    @functools.wraps(method)
    async def handler(raw: bytes, context):
        try:
            request = kind.FromString(raw)
        except DecodeError as exc:
            name = kind.DESCRIPTOR.full_name
            error = ProtocolError(f"the request ({len(raw)} bytes) is not an {name} protobuf message ({exc}); "
                                  f"send a serialized {name}")
            await context.abort(grpc.StatusCode[status(error).grpc], message_of(error))
        return await method(request, context)

    return handler


def method_handlers(servicer: InferenceService) -> dict[str, grpc.RpcMethodHandler]:
    """The unary methods `servicer` implements, from the service's descriptor, each reading its own request
    (`parsed`); the others (ModelStreamInfer, shared memory, trace and log settings) are left to grpcio, which
    answers UNIMPLEMENTED."""
    handlers = {}
    for method in SERVICE.methods:
        if method.name in vars(type(servicer)) and not (method.client_streaming or method.server_streaming):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                parsed(getattr(servicer, method.name), GetMessageClass(method.input_type)),
                response_serializer=GetMessageClass(method.output_type).SerializeToString)
    return handlers


class GrpcServer:
    """The gRPC front end's lifecycle on the app's event loop: start after the models, stop before the drain."""

    def __init__(self, state) -> None:
        settings = state.settings
        self.host, self.port, self.grace_s = settings.host, settings.grpc_port, settings.drain_timeout_s
        interceptors = [grpc_interceptor(settings.restricted_api)] if settings.restricted_api else []
        self._server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=settings.max_grpc_rpcs, options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),  # the REST body limit
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        ])
        handlers = method_handlers(InferenceService(state))  # in place of the generated add_..._to_server
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
        self._server.add_registered_method_handlers(SERVICE.full_name, handlers)
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
