"""Fuzz one real `normfuse serve` process (loopback only) with malformed, protocol-shaped requests: hypothesis
builds REST inference and control requests (JSON and binary bodies: a valid request with one part mutated,
deep nesting, junk) and gRPC calls (ModelInfer messages mutated the same way, raw bytes that are no message at
all), at least 10,000 in all, and every answer must be a client error: no 5xx, no gRPC INTERNAL / UNKNOWN /
UNAVAILABLE. Failures are collected (not shrunk) and reported grouped by message.

Sequential, so no answer may be an overload 503; the model is healthy, so none may be "not ready" either."""

from __future__ import annotations

import collections
import json
import re
import struct
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.test_grpc import GrpcServer
from tests.service.repo_builder import build_test_repo

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]  # ~100 s on 2 cores
# What it finds on this branch (10,500 requests, ~100 s): the request-path fixes of issue 22 item 5 are on the
# svc branch; un-xfail once they are merged.
KNOWN = ("REST 500 for a shape with more dimensions than numpy allows (32 here; e.g. [1]*63 + [2, 4]: the "
         "ValueError from reshape is not mapped); REST 500 RecursionError for a deeply nested JSON body to "
         "/v2/repository/index (1,000+ levels); gRPC UNKNOWN 'Unexpected DecodeError' for bytes that are no "
         "protobuf message (grpcio's own answer when a request does not deserialize)")
grpc = pytest.importorskip("grpc")

REST_CASES, GRPC_CASES = 7_000, 3_500  # >= 10,000 requests to one server
SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]
MODELS = ["linear", "linear/versions/affine", "linear/versions/unfused", "linear/versions/nope", "nope", "%2e%2e",
          "linear/versions/%00", "..", "linear%2Fversions"]

ints = st.one_of(st.integers(-3, 9), st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64, 10**30]))
scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), ints,
                    st.text(max_size=6))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4),
                                                                                       inner, max_size=3),
                    max_leaves=8)
shapes = st.one_of(st.lists(ints, max_size=6), st.lists(st.integers(1, 2), min_size=63, max_size=66), junk)
parameters = st.one_of(st.dictionaries(st.sampled_from(["binary_data_output", "binary_data", "binary_data_size",
                                                        "timeout", "priority", "shared_memory_region", "x"]),
                                       scalars, max_size=3), junk)


@st.composite
def tensors(draw) -> dict:
    """A valid input `x` (rows x 4, FP32) with one field mutated (or none, or one dropped, or one added)."""
    rows = draw(st.integers(1, 3))
    tensor = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": list(range(rows * 4))}
    field = draw(st.sampled_from(["name", "shape", "ones", "datatype", "data", "parameters", "drop", "extra",
                                  "none"]))
    if field == "ones":  # the data still fits: more dimensions than numpy has (64), or just under
        tensor["shape"] = [1] * draw(st.integers(60, 66)) + [rows, 4]
    elif field == "name":
        tensor["name"] = draw(st.sampled_from(["y", "X", "", "x\0"]) | junk)
    elif field == "shape":
        tensor["shape"] = draw(shapes)
    elif field == "datatype":
        tensor["datatype"] = draw(st.sampled_from(DATATYPES + ["FP8", "fp32", "INT128", ""]) | junk)
    elif field == "data":
        tensor["data"] = draw(st.one_of(junk, st.lists(scalars, max_size=12),
                                        st.lists(st.lists(st.floats(), max_size=4), max_size=3)))
    elif field == "parameters":
        tensor["parameters"] = draw(parameters)
    elif field == "drop":
        del tensor[draw(st.sampled_from(sorted(tensor)))]
    elif field == "extra":
        tensor[draw(st.text(max_size=5))] = draw(junk)
    return tensor


@st.composite
def infer_bodies(draw) -> dict:
    body: dict = {"inputs": draw(st.lists(tensors(), min_size=1, max_size=3))}
    for key, values in (("outputs", st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "z"]) | junk},
                                                                    optional={"parameters": parameters}),
                                             max_size=2) | junk),
                        ("parameters", parameters), ("id", junk)):
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        body["inputs"] = draw(junk)
    return body


def nested(depth: int) -> bytes:
    return b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def rest_requests(draw) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body)."""
    kind = draw(st.sampled_from(["json", "json", "json", "binary", "nested", "raw", "control", "get"]))
    model = draw(st.sampled_from(MODELS))
    infer = f"/v2/models/{model}/infer"
    if kind == "json":
        return "POST", infer, {"content-type": "application/json"}, json.dumps(draw(infer_bodies())).encode()
    if kind == "binary":  # Triton's binary extension: JSON header + tensor bytes, the header's length in a header
        body = draw(infer_bodies())
        for tensor in body["inputs"] if isinstance(body["inputs"], list) else []:
            if isinstance(tensor, dict) and draw(st.booleans()):
                tensor.pop("data", None)
                tensor["parameters"] = {"binary_data_size": draw(ints)}
        header = json.dumps(body).encode()
        blob = draw(st.binary(max_size=64))
        length = draw(st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + 80).map(str),
                                st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4)))
        return "POST", infer, {"inference-header-content-length": length}, header + blob
    if kind == "nested":
        return "POST", draw(st.sampled_from([infer, "/v2/repository/index"])), {}, nested(
            draw(st.sampled_from([64, 1_000, 20_000, 100_000])))
    if kind == "raw":
        headers = {"content-encoding": draw(st.sampled_from(["gzip", "deflate", "identity", "br"]))} \
            if draw(st.booleans()) else {}
        return "POST", infer, headers, draw(st.binary(max_size=200))
    if kind == "control":
        path = draw(st.sampled_from(["/v2/repository/index", "/v2/repository/models/linear/load",
                                     "/v2/repository/models/linear/unload", "/v2/repository/models/%2e%2e/load",
                                     "/v2/repository/models/nope/unload"]))
        return "POST", path, {"content-type": "application/json"}, json.dumps(draw(junk)).encode()
    path = draw(st.sampled_from(["", "/ready", "/config", "/stats", "/compare"]))
    return "GET", f"/v2/models/{model}{path}", {}, b""


@st.composite
def grpc_requests(draw) -> tuple[str, bytes]:
    """(method, serialized request): mutated ModelInferRequest / other messages, or bytes that are none."""
    from tritonclient.grpc import service_pb2 as pb

    kind = draw(st.sampled_from(["infer", "infer", "infer", "raw", "other"]))
    if kind == "raw":
        return draw(st.sampled_from(["ModelInfer", "RepositoryIndex", "ModelMetadata"])), draw(st.binary(max_size=80))
    name = draw(st.sampled_from(["linear", "nope", "", ".."]))
    if kind == "other":
        method = draw(st.sampled_from(["ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics",
                                       "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]))
        request = {"ModelMetadata": pb.ModelMetadataRequest, "ModelReady": pb.ModelReadyRequest,
                   "ModelConfig": pb.ModelConfigRequest, "ModelStatistics": pb.ModelStatisticsRequest,
                   "RepositoryIndex": pb.RepositoryIndexRequest, "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
                   "RepositoryModelUnload": pb.RepositoryModelUnloadRequest}[method]()
        for field in ("name", "model_name"):
            if field in request.DESCRIPTOR.fields_by_name:
                setattr(request, field, name)
        return method, request.SerializeToString()
    request = pb.ModelInferRequest(model_name=name, model_version=draw(st.sampled_from(["", "affine", "nope"])))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["x", "y", ""])),
                                    datatype=draw(st.sampled_from(DATATYPES + ["FP8", ""])))
        tensor.shape.extend(draw(st.lists(st.integers(-2, 9) | st.sampled_from([2**31, 2**62, -(2**63)]),
                                          max_size=6) | st.lists(st.integers(1, 2), min_size=63, max_size=66)
                                 | st.integers(60, 66).map(lambda k: [1] * k + [2, 4])))
        contents = draw(st.sampled_from(["fp32", "int64", "bytes", "raw", "none"]))
        if contents == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=12)))
        elif contents == "int64":
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=12)))
        elif contents == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=4)))
        elif contents == "raw":
            request.raw_input_contents.append(draw(st.binary(max_size=64)) if draw(st.booleans())
                                              else struct.pack("<8f", *range(8)))
        for key in draw(st.lists(st.sampled_from(["binary_data_size", "timeout", "priority", "x"]), max_size=2)):
            value = draw(st.integers(-(2**63), 2**63 - 1))
            tensor.parameters[key].int64_param = value
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "binary_data_output"]), max_size=2)):
        kind_of = draw(st.sampled_from(["int64_param", "string_param", "bool_param", "double_param"]))
        value = {"int64_param": draw(ints.filter(lambda i: -(2**63) <= i < 2**63)), "string_param": "x",
                 "bool_param": True, "double_param": draw(st.floats())}[kind_of]
        setattr(request.parameters[key], kind_of, value)
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(["y", "z", ""])))
    return "ModelInfer", request.SerializeToString()


RUN = settings(max_examples=1, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    srv = GrpcServer(build_test_repo(tmp_path_factory.mktemp("fuzz") / "repo", broken=False))
    request.addfinalizer(srv.stop)
    return srv


def fuzz_rest(url: str, failures: list, closed: list) -> int:
    client = httpx.Client(base_url=url, timeout=60)
    sent = 0

    @given(rest_requests())
    @settings(RUN, max_examples=REST_CASES)
    def one(case):
        nonlocal sent
        method, path, headers, body = case
        sent += 1
        try:
            answer = client.request(method, path, headers=headers, content=body)
        except httpx.TransportError:  # answered (e.g. 404) before the upload ended: the connection is closed,
            closed[0] += 1  # and the client, still sending, sees a reset; the last check shows the server is up
            return
        if answer.status_code >= 500:
            failures.append((f"REST {answer.status_code}", path, answer.text[:160], body[:160]))

    one()
    client.close()
    return sent


def fuzz_grpc(target: str, failures: list) -> int:
    channel = grpc.insecure_channel(target)
    sent = 0

    @given(grpc_requests())
    @settings(RUN, max_examples=GRPC_CASES)
    def one(case):
        nonlocal sent
        method, payload = case
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=None, response_deserializer=None)
        sent += 1
        try:
            call(payload, timeout=60)
        except grpc.RpcError as exc:
            if exc.code().name in SERVER_ERRORS:
                failures.append((f"gRPC {exc.code().name}", method, exc.details()[:160], payload[:80]))

    one()
    channel.close()
    return sent


@pytest.mark.xfail(strict=False, reason=KNOWN)
def test_ten_thousand_malformed_requests_get_no_server_error(server, record_property):
    failures: list = []
    closed = [0]  # REST connections closed on the client mid-upload (not a server error)
    started = time.perf_counter()
    sent = fuzz_rest(server.url, failures, closed) + fuzz_grpc(server.grpc, failures)
    seconds = time.perf_counter() - started
    record_property("fuzz_requests", sent)
    record_property("fuzz_seconds", round(seconds, 1))
    print(f"fuzz: {sent} requests in {seconds:.1f} s, {len(failures)} server errors, "  # noqa: T201
          f"{closed[0]} connections closed mid-upload")
    assert sent >= 10_000
    x = np.arange(8, dtype=np.float32).reshape(2, 4).ravel().tolist()
    ok = httpx.post(f"{server.url}/v2/models/linear/infer", timeout=30, json={
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x}]})
    assert ok.status_code == 200, "the server stopped serving during the fuzz"
    kinds = collections.Counter((status, re.sub(r"\d+", "N", message[:80])) for status, _, message, _ in failures)
    assert not failures, "server errors:\n" + "\n".join(f"{n} x {k}" for k, n in kinds.most_common(20))
