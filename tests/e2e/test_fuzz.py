"""Fuzz one real `normfuse serve` process (loopback only) with malformed, protocol-shaped requests: hypothesis
builds REST inference and control requests (JSON and binary bodies: a valid request with one part mutated,
deep nesting, junk) and gRPC calls (ModelInfer messages mutated the same way, raw bytes that are no message at
all), at least 10,000 in all, and every answer must be a client error: no 5xx, no gRPC INTERNAL / UNKNOWN /
UNAVAILABLE. Failures are collected (not shrunk) and reported grouped by message.

Sequential, so no answer may be an overload 503; the model is healthy, so none may be "not ready" either. The one
5xx allowed is a 504 for a request whose own `timeout` parameter passed in the queue (OWN_DEADLINE).

~45 s on 2 cores (about 35 CPU seconds here, mostly hypothesis drawing, and 5 in the server); ~90 s with the
cores shared at a load of 5. benchmarks/hostile_bench.py runs the same functions for BENCHMARKS.md's figures."""

from __future__ import annotations

import collections
import json
import os
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

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
grpc = pytest.importorskip("grpc")

REST_CASES, GRPC_CASES = 7_000, 3_500  # >= 10,000 requests to one server
SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
# a 504 whose request set Triton's `timeout` parameter and waited longer in the queue: the deadline the client
# asked for (gRPC's DEADLINE_EXCEEDED, which is not in SERVER_ERRORS either), not a server error
OWN_DEADLINE = "request timeout expired"
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]
SERVED = ["linear", "linear/versions/affine", "linear/versions/unfused"]
MODELS = [*SERVED, "linear/versions/nope", "nope", "%2e%2e", "linear/versions/%00", "..", "linear%2Fversions"]

# Strategies are built once, here: one built inside a draw is validated again on every draw, which costs more
# than the request it makes (hypothesis's per-example time, not the server's, is what bounds this test).
ints = st.one_of(st.integers(-3, 9), st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64, 10**30]))
scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), ints,
                    st.text(max_size=6))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4),
                                                                                       inner, max_size=3),
                    max_leaves=8)
# dimensions around both of numpy's limits (32 in numpy 1, 64 in numpy 2), the data still fitting
many_dims = st.integers(28, 66)
shapes = st.one_of(st.lists(ints, max_size=6), st.lists(st.integers(1, 2), min_size=63, max_size=66), junk)
parameters = st.one_of(st.dictionaries(st.sampled_from(["binary_data_output", "binary_data", "binary_data_size",
                                                        "timeout", "priority", "shared_memory_region", "x"]),
                                       scalars, max_size=3), junk)
FIELD = {"rows": st.integers(1, 3),
         "which": st.sampled_from(["name", "shape", "ones", "datatype", "data", "parameters", "drop", "extra",
                                   "none"]),
         "name": st.sampled_from(["y", "X", "", "x\0"]) | junk,
         "datatype": st.sampled_from(DATATYPES + ["FP8", "fp32", "INT128", ""]) | junk,
         "data": st.one_of(junk, st.lists(scalars, max_size=12), st.lists(st.lists(st.floats(), max_size=4),
                                                                          max_size=3)),
         "drop": st.sampled_from(["data", "datatype", "name", "shape"]),
         "extra": st.text(max_size=5)}


@st.composite
def tensors(draw) -> dict:
    """A valid input `x` (rows x 4, FP32) with one field mutated (or none, or one dropped, or one added)."""
    rows = draw(FIELD["rows"])
    tensor = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": list(range(rows * 4))}
    field = draw(FIELD["which"])
    if field == "ones":
        tensor["shape"] = [1] * draw(many_dims) + [rows, 4]
    elif field in ("name", "datatype", "data"):
        tensor[field] = draw(FIELD[field])
    elif field == "shape":
        tensor["shape"] = draw(shapes)
    elif field == "parameters":
        tensor["parameters"] = draw(parameters)
    elif field == "drop":
        del tensor[draw(FIELD["drop"])]
    elif field == "extra":
        tensor[draw(FIELD["extra"])] = draw(junk)
    return tensor


quarter, tenth, coin, any_float = st.integers(0, 3), st.integers(0, 9), st.booleans(), st.floats()
BODY_PARTS = (("outputs", st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "z"]) | junk},
                                                         optional={"parameters": parameters}), max_size=2) | junk),
              ("parameters", parameters), ("id", junk))
input_lists = st.lists(tensors(), min_size=1, max_size=3)


@st.composite
def infer_bodies(draw) -> dict:
    body: dict = {"inputs": draw(input_lists)}
    for key, values in BODY_PARTS:
        if draw(quarter) == 0:
            body[key] = draw(values)
    if draw(tenth) == 0:
        body["inputs"] = draw(junk)
    return body


def nested(depth: int) -> bytes:
    return b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"


REST = {"kind": st.sampled_from(["json", "json", "json", "binary", "nested", "raw", "control", "get"]),
        # a served model two times in three: a request for none is answered 404 before its body is read
        "model": st.sampled_from(SERVED) | st.sampled_from(MODELS),
        "blob": st.binary(max_size=64), "raw": st.binary(max_size=200),
        "odd length": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),
        "depth": st.sampled_from([64, 1_000, 20_000, 100_000]),
        "encoding": st.sampled_from(["gzip", "deflate", "identity", "br"]),
        "control": st.sampled_from(["/v2/repository/index", "/v2/repository/models/linear/load",
                                    "/v2/repository/models/linear/unload", "/v2/repository/models/%2e%2e/load",
                                    "/v2/repository/models/nope/unload"]),
        "get": st.sampled_from(["", "/ready", "/config", "/stats", "/compare"])}
bodies = infer_bodies()


@st.composite
def rest_requests(draw) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body)."""
    kind = draw(REST["kind"])
    model = draw(REST["model"])
    infer = f"/v2/models/{model}/infer"
    if kind == "json":
        return "POST", infer, {"content-type": "application/json"}, json.dumps(draw(bodies)).encode()
    if kind == "binary":  # Triton's binary extension: JSON header + tensor bytes, the header's length in a header
        body = draw(bodies)
        for tensor in body["inputs"] if isinstance(body["inputs"], list) else []:
            if isinstance(tensor, dict) and draw(coin):
                tensor.pop("data", None)
                tensor["parameters"] = {"binary_data_size": draw(ints)}
        header = json.dumps(body).encode()
        blob = draw(REST["blob"])
        length = draw(st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + 80).map(str),
                                REST["odd length"]))
        return "POST", infer, {"inference-header-content-length": length}, header + blob
    if kind == "nested":
        return "POST", "/v2/repository/index" if draw(coin) else infer, {}, nested(draw(REST["depth"]))
    if kind == "raw":
        headers = {"content-encoding": draw(REST["encoding"])} if draw(coin) else {}
        return "POST", infer, headers, draw(REST["raw"])
    if kind == "control":
        return "POST", draw(REST["control"]), {"content-type": "application/json"}, json.dumps(draw(junk)).encode()
    return "GET", f"/v2/models/{model}{draw(REST['get'])}", {}, b""


OTHER_METHODS = ["ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics", "RepositoryIndex",
                 "RepositoryModelLoad", "RepositoryModelUnload"]
GRPC = {"kind": st.sampled_from(["infer", "infer", "infer", "raw", "other"]),
        "raw method": st.sampled_from(["ModelInfer", "RepositoryIndex", "ModelMetadata"]),
        "raw": st.binary(max_size=80),
        "name": st.just("linear") | st.sampled_from(["linear", "nope", "", ".."]),  # mostly one that is served
        "other": st.sampled_from(OTHER_METHODS), "version": st.sampled_from(["", "affine", "nope"]),
        "inputs": st.integers(0, 3), "input": st.sampled_from(["x", "y", ""]),
        "datatype": st.sampled_from(DATATYPES + ["FP8", ""]),
        "shape": (st.lists(st.integers(-2, 9) | st.sampled_from([2**31, 2**62, -(2**63)]), max_size=6)
                  | st.lists(st.integers(1, 2), min_size=63, max_size=66) | many_dims.map(lambda k: [1] * k + [2, 4])),
        "contents": st.sampled_from(["fp32", "int64", "bytes", "raw", "none"]),
        "fp32": st.lists(st.floats(width=32), max_size=12),
        "int64": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=12),
        "bytes": st.lists(st.binary(max_size=8), max_size=4), "blob": st.binary(max_size=64),
        "input parameters": st.lists(st.sampled_from(["binary_data_size", "timeout", "priority", "x"]), max_size=2),
        "int64 value": st.integers(-(2**63), 2**63 - 1),
        "parameters": st.lists(st.sampled_from(["timeout", "priority", "binary_data_output"]), max_size=2),
        "parameter kind": st.sampled_from(["int64_param", "string_param", "bool_param", "double_param"]),
        "int64 parameter": ints.filter(lambda i: -(2**63) <= i < 2**63),
        "outputs": st.integers(0, 2), "output": st.sampled_from(["y", "z", ""])}


@st.composite
def grpc_requests(draw) -> tuple[str, bytes]:
    """(method, serialized request): mutated ModelInferRequest / other messages, or bytes that are none."""
    from tritonclient.grpc import service_pb2 as pb

    kind = draw(GRPC["kind"])
    if kind == "raw":
        return draw(GRPC["raw method"]), draw(GRPC["raw"])
    name = draw(GRPC["name"])
    if kind == "other":
        method = draw(GRPC["other"])
        request = getattr(pb, f"{method}Request")()
        for field in ("name", "model_name"):
            if field in request.DESCRIPTOR.fields_by_name:
                setattr(request, field, name)
        return method, request.SerializeToString()
    request = pb.ModelInferRequest(model_name=name, model_version=draw(GRPC["version"]))
    for _ in range(draw(GRPC["inputs"])):
        tensor = request.inputs.add(name=draw(GRPC["input"]), datatype=draw(GRPC["datatype"]))
        tensor.shape.extend(draw(GRPC["shape"]))
        contents = draw(GRPC["contents"])
        if contents in ("fp32", "int64", "bytes"):
            getattr(tensor.contents, f"{contents}_contents").extend(draw(GRPC[contents]))
        elif contents == "raw":
            request.raw_input_contents.append(draw(GRPC["blob"]) if draw(coin)
                                              else struct.pack("<8f", *range(8)))
        for key in draw(GRPC["input parameters"]):
            tensor.parameters[key].int64_param = draw(GRPC["int64 value"])
    for key in draw(GRPC["parameters"]):
        kind_of = draw(GRPC["parameter kind"])
        value = {"int64_param": draw(GRPC["int64 parameter"]), "string_param": "x",
                 "bool_param": True, "double_param": draw(any_float)}[kind_of]
        setattr(request.parameters[key], kind_of, value)
    for _ in range(draw(GRPC["outputs"])):
        request.outputs.add(name=draw(GRPC["output"]))
    return "ModelInfer", request.SerializeToString()


RUN = settings(max_examples=1, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    srv = GrpcServer(build_test_repo(tmp_path_factory.mktemp("fuzz") / "repo", broken=False))
    request.addfinalizer(srv.stop)
    return srv


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used: what the fuzz costs, whatever else shares the cores."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fuzz_rest(url: str, cases: int, seen: collections.Counter, failures: list) -> int:
    """`cases` REST requests; each answer's status counted in `seen` ("closed" for a connection the server closed
    mid-upload), each server error appended to `failures`. Returns the number sent."""
    client = httpx.Client(base_url=url, timeout=60)
    sent = 0

    @given(rest_requests())
    @settings(RUN, max_examples=cases)
    def one(case):
        nonlocal sent
        method, path, headers, body = case
        sent += 1
        try:
            answer = client.request(method, path, headers=headers, content=body)
        except httpx.TransportError:  # answered (e.g. 404) before the upload ended: the connection is closed,
            seen["closed"] += 1  # and the client, still sending, sees a reset; the last check shows the server is up
            return
        seen[str(answer.status_code)] += 1
        if answer.status_code >= 500 and not (answer.status_code == 504 and OWN_DEADLINE in answer.text):
            failures.append((f"REST {answer.status_code}", path, answer.text[:160], body[:160]))

    one()
    client.close()
    return sent


def fuzz_grpc(target: str, cases: int, seen: collections.Counter, failures: list) -> int:
    """`cases` gRPC calls; each answer's code counted in `seen`, each server error appended to `failures`."""
    channel = grpc.insecure_channel(target)
    sent = 0

    @given(grpc_requests())
    @settings(RUN, max_examples=cases)
    def one(case):
        nonlocal sent
        method, payload = case
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=None, response_deserializer=None)
        sent += 1
        try:
            call(payload, timeout=60)
        except grpc.RpcError as exc:
            seen[exc.code().name] += 1
            if exc.code().name in SERVER_ERRORS:
                failures.append((f"gRPC {exc.code().name}", method, exc.details()[:160], payload[:80]))
        else:
            seen["OK"] += 1

    one()
    channel.close()
    return sent


def test_ten_thousand_malformed_requests_get_no_server_error(server, record_property):
    rest, grpc_codes, failures = collections.Counter(), collections.Counter(), []
    started, client_cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_s(server.proc.pid)
    sent = (fuzz_rest(server.url, REST_CASES, rest, failures)
            + fuzz_grpc(server.grpc, GRPC_CASES, grpc_codes, failures))
    seconds = time.perf_counter() - started
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_s(server.proc.pid) - server_cpu
    record_property("fuzz_requests", sent)
    record_property("fuzz_seconds", round(seconds, 1))
    print(f"fuzz: {sent} requests in {seconds:.1f} s (CPU: {client_cpu:.0f} s here, {server_cpu:.0f} s in the "  # noqa: T201
          f"server), {len(failures)} server errors; REST {dict(rest)}, gRPC {dict(grpc_codes)}")
    assert sent >= 10_000
    assert "200" in rest and "400" in rest and "INVALID_ARGUMENT" in grpc_codes  # the fuzz reached the checks
    x = np.arange(8, dtype=np.float32).reshape(2, 4).ravel().tolist()
    ok = httpx.post(f"{server.url}/v2/models/linear/infer", timeout=30, json={
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x}]})
    assert ok.status_code == 200, "the server stopped serving during the fuzz"
    kinds = collections.Counter((status, re.sub(r"\d+", "N", message[:80])) for status, _, message, _ in failures)
    assert not failures, "server errors:\n" + "\n".join(f"{n} x {k}" for k, n in kinds.most_common(20))
