"""One inference request, whatever protocol brought it: resolve (and lease the revision) -> receive -> admit ->
read the header -> check it against the model and size the answer -> decode -> check -> submit -> encode ->
record. The REST route and the gRPC service are adapters: each wraps its request in a `Message` (how to receive
it, read its header and tensors, encode the answer) and translates what comes back, or the error, into its own
types (service.errors maps every error to both an HTTP status and a gRPC code). The limits live here and in
`Admission`, so a limit or a status added once holds for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from oip.parameters import binary_choices, priority_of, timeout_of
from oip.schema import InferenceRequest
from service.admission import Admission
from service.batcher import Result
from service.body import Pace
from service.errors import CLIENT_GONE, ResponseTooLarge, status_of
from service.metrics import Metrics
from service.repository import Repository
from service.revision import Servable
from service.settings import Settings
from service.validation import Size, answer_size, check_header, sizes_of

JSON_PER_BYTE = 4  # about how many bytes of JSON text one byte of a float32 array becomes (~16 chars per value)


@dataclass(frozen=True)
class Answer:
    """What the engine gave back for one request, and what the client asked to get (output -> binary?)."""

    model: str
    servable: Servable
    request_id: str | None
    result: Result
    outputs: dict[str, bool]

    @property
    def datatypes(self) -> dict[str, str]:
        return {spec.name: spec.datatype for spec in self.servable.engine.outputs}


class Message(Protocol):
    """One protocol's inference request, as the call reads it."""

    protocol: str  # "http" or "grpc": the label of its metrics
    size: int  # bytes received: decides whether decoding runs off the event loop
    binary_only: bool  # every output goes back as raw bytes (gRPC)

    async def receive(self) -> None:
        """Read the rest of the message (REST: the body; gRPC: already in)."""

    def header(self) -> InferenceRequest:
        """The request without its tensors decoded (ProtocolError, SchemaError)."""

    def tensors(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """The input arrays (ProtocolError)."""

    def encode(self, answer: Answer) -> Any:
        """The protocol's response."""


class Inference:
    """The inference call over the app's repository, admission, metrics and limits."""

    def __init__(self, settings: Settings, repo: Repository, admission: Admission, metrics: Metrics) -> None:
        self.repo, self.admission, self.metrics = repo, admission, metrics
        # the limits, in one place (service.settings documents each; Admission holds max_inflight and the
        # receiving budget, the gRPC server and uvicorn the connection limits)
        self.offload_bytes = settings.offload_bytes  # messages this large are decoded and encoded off the loop
        self.pace = Pace(settings.body_timeout_s, settings.min_upload_bytes_per_s)  # how fast a REST body must come
        self.max_response_bytes = settings.max_response_bytes
        self.max_json_response_bytes = settings.max_json_response_bytes

    async def __call__(self, model: str, version: str | None, message: Message,
                       wait: Callable[[Awaitable[Result]], Awaitable[Result]] | None = None) -> Any:
        """The encoded answer to `message` for (model, version); `wait(work)` awaits the batcher (REST cancels it
        when its client leaves). Raises the domain error of whatever went wrong."""
        servable = self.repo.get(model, version)
        async with servable.revision.lease():
            return await self._run(model, servable, message, wait)

    async def _run(self, model: str, servable: Servable, message: Message, wait) -> Any:
        # the code recorded in metrics; stays 499 if the call is cancelled (the client went away)
        started, code, queue_s, rows = time.perf_counter(), CLIENT_GONE, None, 0
        servable.children.of(self.metrics.inflight).inc()
        try:
            await message.receive()
            with self.admission.admit():
                request = await self._off_loop(message.size, message.header)
                declared = check_header(servable.engine.inputs, servable.constraints, request)  # before decoding
                servable.batcher.check_rows(next(iter(declared.values())).shape[0])
                outputs = self.outputs(servable, request, message.binary_only)
                self.check_answer(outputs, answer_size(servable.engine, declared))  # before compute
                arrays = await self._off_loop(message.size, message.tensors, request)
                rows = servable.check(arrays)
                work = servable.batcher.submit(arrays, timeout_of(request.parameters), priority_of(request.parameters))
                result = await (wait(work) if wait is not None else work)
                queue_s = result.queue_s
                self.check_answer(outputs, sizes_of(result.outputs))  # an engine that answered larger than said
                answer = Answer(model, servable, request.id, result, outputs)
                response = await self._off_loop(answer_bytes(answer), message.encode, answer)
            code = 200
            return response
        except Exception as exc:
            code = status_of(exc)[0]
            raise
        finally:
            record(self.metrics, servable, message.protocol, code, time.perf_counter() - started, queue_s, rows)

    @staticmethod
    def outputs(servable: Servable, request: InferenceRequest, binary_only: bool) -> dict[str, bool]:
        """The outputs to return (all when none are named), each binary or not (ProtocolError)."""
        choices = binary_choices(request, [spec.name for spec in servable.engine.outputs])
        return dict.fromkeys(choices, True) if binary_only else choices

    def check_answer(self, outputs: dict[str, bool], sizes: dict[str, Size]) -> None:
        """ResponseTooLarge (413) if the outputs asked for (name -> binary?) of these sizes are over
        max_response_bytes, or one asked for as JSON is over max_json_response_bytes."""
        total = 0
        for name, binary in outputs.items():
            size = sizes[name]
            wire, encoding = (size.binary, "binary") if binary else (size.json, "JSON (about)")
            total += wire
            if not binary and size.json > self.max_json_response_bytes:
                raise ResponseTooLarge(
                    f"output {name!r} of shape {list(size.shape)} would be {size.json} bytes as JSON (about); JSON "
                    f"outputs are limited to {self.max_json_response_bytes} bytes (max_json_response_bytes): ask for "
                    f"it as binary ({size.binary} bytes) with parameters.binary_data_output = true or "
                    "outputs[].parameters.binary_data = true (tritonclient: binary_data=True)")
            if wire > self.max_response_bytes:
                raise ResponseTooLarge(f"output {name!r} of shape {list(size.shape)} would be {wire} bytes as "
                                       f"{encoding}; the limit is {self.max_response_bytes} bytes (max_response_bytes)")
        if total > self.max_response_bytes:
            raise ResponseTooLarge(f"the outputs {list(outputs)} would be {total} bytes together; the limit is "
                                   f"{self.max_response_bytes} bytes (max_response_bytes): ask for fewer outputs")

    async def _off_loop(self, size: int, fn, *args):
        """fn(*args) on a worker thread for a large message, else right here on the event loop."""
        return await asyncio.to_thread(fn, *args) if size >= self.offload_bytes else fn(*args)


def answer_bytes(answer: Answer) -> int:
    """About how many bytes the encoded answer takes (JSON text is ~JSON_PER_BYTE times the array)."""
    outputs = answer.result.outputs
    return sum(outputs[name].nbytes * (1 if binary else JSON_PER_BYTE) for name, binary in answer.outputs.items())


def record(m: Metrics, servable: Servable, protocol: str, code: int, seconds: float, queue_s: float | None,
           rows: int) -> None:
    """One answered (or abandoned) inference request, over `protocol` ("http" or "grpc"), in metrics and stats."""
    children = servable.children
    children.of(m.inflight).dec()
    children.of(m.requests, protocol, str(code)).inc()
    children.of(m.request, protocol).observe(seconds)
    if queue_s is not None:
        children.of(m.queue).observe(queue_s)
    servable.stats.record_request(code == 200, seconds, queue_s, rows)
