"""No 500 from client input (issue 22): a seeded mutation fuzz of protocol-shaped inference requests against the
real app (in-process REST and gRPC on a free port, the exact fake engine). Every answer is a 2xx or 4xx over REST
and never INTERNAL/UNKNOWN over gRPC. Bounded (a few hundred requests each) so that it runs in the suite; the
mutations are the kinds the issue's fuzz found 500s with (65 dimensions, huge shapes, odd numbers, deep JSON)."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.process import free_port
from tests.service.fakes import AffineEngine
from tests.service.repo_builder import MODEL

pytestmark = pytest.mark.timeout(180)
REQUESTS = 400
ODD = [0, -1, 1, 4, 65, 2**31 - 1, 2**31, 2**63, 10**30, 1.5, float("nan"), "4", None, True, [], {}, [1] * 65, "x" * 50]


def mutate(rng: random.Random, value):
    """`value` with one random change somewhere inside it."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        choice = rng.random()
        if choice < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if choice < 0.3:
            return {**value, key: rng.choice(ODD)}
        return {**value, key: mutate(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        choice = rng.random()
        if choice < 0.2:
            return value[:i] + value[i + 1:]
        if choice < 0.4:
            return value + [rng.choice(ODD)] * rng.choice([1, 64, 65])
        return value[:i] + [mutate(rng, value[i])] + value[i + 1:]
    return rng.choice(ODD)


def rest_bodies(rng: random.Random) -> list[tuple[bytes, dict]]:
    # no `timeout` parameter: a request's own queue timeout is answered 504, rightly (the client asked for it)
    valid = {"id": "1", "parameters": {"priority": 1}, "outputs": [{"name": "y", "parameters": {}}],
             "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}]}
    bodies = []
    for _ in range(REQUESTS):
        kind = rng.random()
        if kind < 0.7:
            text = json.dumps(mutate(rng, valid)).encode()
        elif kind < 0.85:  # bytes flipped, cut, or nested deep
            text = bytearray(json.dumps(valid).encode())
            for _ in range(rng.randint(1, 5)):
                text[rng.randrange(len(text))] = rng.randrange(256)
            text = bytes(text[: rng.randint(0, len(text))])
        elif kind < 0.9:
            text = b"[" * rng.choice([1000, 100_000]) + b"]" * rng.choice([0, 1000])
        else:  # binary with a wrong header length or size
            head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": rng.choice([0, 12, 16, 2**40])}}]})
            blob = np.zeros(rng.choice([0, 3, 4]), np.float32).tobytes()
            bodies.append((head.encode() + blob, {"Inference-Header-Content-Length": str(rng.choice(
                [len(head), len(head) + 1, 0, -1, 10**20]))}))
            continue
        bodies.append((text, {}))
    return bodies


def grpc_requests(rng: random.Random) -> list:
    from tritonclient.grpc import service_pb2 as pb

    requests = []
    for _ in range(REQUESTS):
        request = pb.ModelInferRequest(model_name=rng.choice([MODEL, MODEL, "", "x" * 300]))
        for _ in range(rng.choice([0, 1, 1, 2, 70])):
            dims = rng.choice([[1, 4], [2, 4], [1] * 65, [2**31 - 1, 2**31 - 1], [-1, 4], [0, 4], []])
            tensor = request.inputs.add(name=rng.choice(["x", "y", ""]), shape=dims,
                                        datatype=rng.choice(["FP32", "FP16", "INT64", "BYTES", "nope"]))
            if rng.random() < 0.5:
                request.raw_input_contents.append(bytes(rng.choice([0, 4, 16, 33])))
            else:
                tensor.contents.fp32_contents.extend([1.0] * rng.choice([0, 4, 8]))
        if rng.random() < 0.3:  # invalid or no timeouts only (a short valid one is a rightful 504)
            request.parameters["timeout"].int64_param = rng.choice([-1, 0, 2**62])
        if rng.random() < 0.2:
            request.parameters["binary_data_output"].string_param = "yes"
        requests.append(request)
    return requests


def test_fuzzed_requests_never_get_a_server_error(test_repo):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    rng = random.Random(22)
    settings = Settings(repo=test_repo, grpc_port=free_port(), warmup_batch_sizes=[], max_body_bytes=1 << 20)
    app = create_app(settings, loader=lambda *a, **k: AffineEngine().load())

    async def main():
        statuses, codes = [], []
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                for body, headers in rest_bodies(rng):
                    r = await c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
                    statuses.append((r.status_code, body[:120]))
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for request in grpc_requests(rng):
                    try:
                        await stub.ModelInfer(request)
                        codes.append(("OK", ""))
                    except grpc.aio.AioRpcError as exc:
                        codes.append((exc.code().name, exc.details()))
        return statuses, codes

    statuses, codes = asyncio.run(main())
    assert [s for s in statuses if s[0] >= 500] == []
    assert [c for c in codes if c[0] in ("INTERNAL", "UNKNOWN")] == []
    assert len({s for s, _ in statuses}) >= 3 and {"INVALID_ARGUMENT", "NOT_FOUND"} <= {c for c, _ in codes}
