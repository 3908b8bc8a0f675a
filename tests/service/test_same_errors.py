"""REST and gRPC answer the same bad request with the same status and the same message, since both are adapters
over one inference call (service.inference) and one error table (service.errors). In-process: the real app,
lifespan, batcher and gRPC server on a free port, the exact fake engine (x (-1, 4) -> y); REST through httpx,
gRPC through the generated stub with the equivalent ModelInferRequest."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from oip.codec import MAX_DIMS
from service.app import create_app
from service.errors import STATUS
from service.settings import Settings
from tests.process import free_port
from tests.service.fakes import AffineEngine
from tests.service.repo_builder import MODEL

pytestmark = pytest.mark.timeout(120)
X = np.arange(4, dtype=np.float32).reshape(1, 4)


def case(inputs, *, outputs=None, parameters=None, model=MODEL, version=None):
    """One request as (REST path, REST body, REST headers) and the gRPC message's fields. Each input is
    (name, shape, datatype, values as bytes)."""
    return {"inputs": inputs, "outputs": outputs, "parameters": parameters or {}, "model": model, "version": version}


CASES = {
    "unknown model": (case([("x", [1, 4], "FP32", X.tobytes())], model="nope"), 404, "NOT_FOUND"),
    "unknown version": (case([("x", [1, 4], "FP32", X.tobytes())], version="v9"), 404, "NOT_FOUND"),
    "unknown input": (case([("z", [1, 4], "FP32", X.tobytes())]), 400, "INVALID_ARGUMENT"),
    "wrong datatype": (case([("x", [1, 4], "INT32", X.astype(np.int32).tobytes())]), 400, "INVALID_ARGUMENT"),
    "wrong shape": (case([("x", [1, 2], "FP32", X[:, :2].tobytes())]), 400, "INVALID_ARGUMENT"),
    "short data": (case([("x", [1, 4], "FP32", X.tobytes()[:12])]), 400, "INVALID_ARGUMENT"),
    "unknown output": (case([("x", [1, 4], "FP32", X.tobytes())], outputs=["w"]), 400, "INVALID_ARGUMENT"),
    "bad timeout": (case([("x", [1, 4], "FP32", X.tobytes())], parameters={"timeout": -5}), 400, "INVALID_ARGUMENT"),
    "unknown datatype": (case([("x", [1, 4], "FP99", X.tobytes())]), 400, "INVALID_ARGUMENT"),
    "65 dimensions": (case([("x", [1] * 65, "FP32", X.tobytes()[:4])]), 400, "INVALID_ARGUMENT"),
    # the fuzz's REST 500 and gRPC INTERNAL: 33 dimensions (one past numpy 1's limit) once reached numpy
    "one dimension past numpy's": (case([("x", [1] * (MAX_DIMS + 1), "FP32", X.tobytes()[:4])]), 400,
                                   "INVALID_ARGUMENT"),
    "as many dimensions as numpy takes": (case([("x", [1] * (MAX_DIMS - 1) + [4], "FP32", X.tobytes())]), 400,
                                          "INVALID_ARGUMENT"),
    "more rows than the queue holds": (case([("x", [8 * 256 + 1, 4], "FP32", np.zeros((2049, 4), np.float32).tobytes())]),
                                       413, "INVALID_ARGUMENT"),
    "answer over max_response_bytes": (case([("x", [100, 4], "FP32", np.zeros((100, 4), np.float32).tobytes())],
                                            parameters={"binary_data_output": True}), 413, "RESOURCE_EXHAUSTED"),
}


def rest_request(c):
    """A binary REST request carrying exactly the gRPC message's contents."""
    head = {"inputs": [{"name": n, "shape": s, "datatype": d, "parameters": {"binary_data_size": len(b)}}
                       for n, s, d, b in c["inputs"]]}
    if c["parameters"]:
        head["parameters"] = c["parameters"]
    if c["outputs"]:
        head["outputs"] = [{"name": name, "parameters": {"binary_data": True}} for name in c["outputs"]]
    text = json.dumps(head).encode()
    path = f"/v2/models/{c['model']}" + (f"/versions/{c['version']}" if c["version"] else "") + "/infer"
    body = text + b"".join(b for *_, b in c["inputs"])
    return path, body, {"Inference-Header-Content-Length": str(len(text)), "content-type": "application/octet-stream"}


def grpc_request(c):
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=c["model"], model_version=c["version"] or "")
    for name, shape, datatype, data in c["inputs"]:
        request.inputs.add(name=name, shape=shape, datatype=datatype)
        request.raw_input_contents.append(data)
    for key, value in c["parameters"].items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = value
    for name in c["outputs"] or []:
        request.outputs.add(name=name)
    return request


def test_rest_and_grpc_give_the_same_status_and_message(test_repo):
    import grpc
    import httpx
    from tritonclient.grpc import service_pb2_grpc

    settings = Settings(repo=test_repo, grpc_port=free_port(), warmup_batch_sizes=[], max_response_bytes=1024)
    app = create_app(settings, loader=lambda *a, **k: AffineEngine().load())

    async def main():
        answers = {}
        async with app.router.lifespan_context(app):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel, \
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for name, (c, _, _) in CASES.items():
                    path, body, headers = rest_request(c)
                    rest = await client.post(path, content=body, headers=headers)
                    try:
                        await stub.ModelInfer(grpc_request(c))
                        over_grpc = ("OK", "")
                    except grpc.aio.AioRpcError as exc:
                        over_grpc = (exc.code().name, exc.details())
                    answers[name] = (rest.status_code, rest.json().get("error"), *over_grpc)
        return answers

    answers = asyncio.run(main())
    for name, (_, status, code) in CASES.items():
        rest_status, rest_message, grpc_code, grpc_message = answers[name]
        assert (rest_status, grpc_code) == (status, code), (name, answers[name])
        assert rest_message == grpc_message and rest_message, (name, answers[name])


@pytest.mark.parametrize("method", ["ModelInfer", "RepositoryIndex", "ModelMetadata", "ServerLive"])
def test_bytes_that_are_no_protobuf_message_are_invalid_argument(test_repo, method):
    """The fuzz's gRPC UNKNOWN ("Unexpected DecodeError", grpcio's own answer when a request does not deserialize):
    INVALID_ARGUMENT naming the message expected, through the error table; a real message still works after."""
    import grpc

    settings = Settings(repo=test_repo, grpc_port=free_port(), warmup_batch_sizes=[])
    app = create_app(settings, loader=lambda *a, **k: AffineEngine().load())

    async def main():
        async with app.router.lifespan_context(app):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                def call(name):
                    return channel.unary_unary(f"/inference.GRPCInferenceService/{name}")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(method)(b"\x0a\x05ab")  # a field 1 of 5 bytes, 2 of them sent
                with pytest.raises(grpc.aio.AioRpcError) as streaming:  # not served here: grpcio's own answer
                    await call("ModelStreamInfer")(b"")
                return refused.value, streaming.value, await call("ServerLive")(b"")

    refused, streaming, live = asyncio.run(main())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert f"not an inference.{method}Request protobuf message" in refused.details()
    assert streaming.code() == grpc.StatusCode.UNIMPLEMENTED
    assert live == b"\x08\x01"  # ServerLiveResponse(live=True)


def test_every_http_status_in_the_table_has_one_grpc_code():
    """One table: a status never maps to two gRPC codes unless the row says why (FAILED_PRECONDITION, 413)."""
    codes = {}
    for _, row in STATUS:
        codes.setdefault(row.http, set()).add(row.grpc)
    assert codes[404] == {"NOT_FOUND"} and codes[503] == {"UNAVAILABLE"} and codes[499] == {"CANCELLED"}
    assert codes[400] == {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}
