"""The real `normfuse serve` process on a free port: Triton's own client (JSON and binary), shadow mode and
/compare, and SIGTERM under load (every accepted request answered, then exit)."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from tests.service.repo_builder import BROKEN, MODEL, build_test_repo, expected
from tests.service.server_process import Server, inflight, sigterm_with_requests_in_flight

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_test_repo(tmp_path_factory.mktemp("e2e") / "repo")


@pytest.fixture(scope="module")
def server(repo):
    srv = Server(repo, "--max-queue-delay-ms", "5", env={"NORMFUSE_SHADOW_RATE": "1.0"})
    yield srv
    srv.stop()


def test_tritonclient_round_trip_json_and_binary(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready(BROKEN)
    assert client.get_model_metadata(MODEL)["versions"] == ["unfused", "affine"]
    assert client.get_model_config(MODEL)["max_batch_size"] == 8
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    for binary in (True, False):
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("y", binary_data=binary)
        result = client.infer(MODEL, [inp], outputs=[out], request_id=f"r-{binary}")
        np.testing.assert_array_equal(result.as_numpy("y"), expected(x))
        assert result.get_response()["id"] == f"r-{binary}"
    inp = triton.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x[:2])  # all defaults: binary input, binary outputs for everything
    np.testing.assert_array_equal(client.infer(MODEL, [inp], model_version="unfused").as_numpy("y"), expected(x[:2]))
    for algorithm in ("gzip", "deflate"):  # compressed request bodies
        result = client.infer(MODEL, [inp], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("y"), expected(x[:2]))
    stats = client.get_inference_statistics(MODEL)["model_stats"]
    assert sum(s["inference_count"] for s in stats) >= 12
    index = client.get_model_repository_index()
    assert {"name": MODEL, "version": "affine", "state": "READY"} in index
    with pytest.raises(triton.InferenceServerException, match="unknown input"):
        bad = triton.InferInput("z", [1, 4], "FP32")
        bad.set_data_from_numpy(x[:1])
        client.infer(MODEL, [bad])
    client.close()
    assert f"model {BROKEN} variant unfused not loaded" in server.output()  # the reason is in the log


def test_shadow_mode_and_compare(server):
    x = np.ones((4, 4), np.float32)
    body = {"inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(10):
            assert c.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 200
            time.sleep(0.02)  # let the (single, bounded) shadow worker finish between batches
        compare = c.get(f"/v2/models/{MODEL}/compare").json()
        metrics = c.get("/metrics").text
    affine = compare["variants"]["affine"]
    assert affine["shadow"]["pairs"] >= 1
    assert affine["shadow"]["max_abs_error"] == 0.0  # both variants are exact
    assert affine["compute_ms"]["4"]["n"] >= 10 and affine["compute_ms"]["4"]["p50"] > 0
    assert affine["parity"][0]["passed"] is True
    assert compare["variants"]["unfused"]["shadow"]["pairs"] == 0  # unfused is the baseline, never shadowed
    assert 'normfuse_shadow_latency_ratio_count{backend="onnxruntime",model="linear",variant="affine"}' in metrics
    assert 'normfuse_shadow_abs_error_bucket{backend="onnxruntime",le="0.0",model="linear",variant="affine"}' in metrics


@pytest.fixture(scope="module")
def slow_server(repo):
    # a long batching window: requests sit in the batcher's queue for 1.5 s
    srv = Server(repo, "--max-queue-delay-ms", "1500", "--max-batch-size", "8")
    yield srv
    srv.stop()


def metric(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_request_whose_client_has_gone_is_dropped_before_compute(slow_server):
    url = slow_server.url
    payload = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [42] * 4}]})
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n{payload}").encode()
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 20
        while inflight(url) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert inflight(url) == 1
    # the client is gone; the batcher drops the request when its window closes, without running it
    deadline = time.monotonic() + 20
    dropped = 'normfuse_dropped_requests_total{backend="onnxruntime",model="linear",reason="cancelled"'
    while metric(url, dropped) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, dropped) == 1
    assert metric(url, "normfuse_batch_size_count{") == 0  # no engine run at all
    assert inflight(url) == 0 and metric(url, 'normfuse_requests_total{backend="onnxruntime",code="499"') == 1


def test_sigterm_under_load_answers_every_accepted_request(slow_server):
    srv = slow_server
    xs = [np.full((1, 4), i, np.float32) for i in range(6)]
    results: list[object] = [None] * len(xs)

    def call(i: int) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": xs[i].reshape(-1).tolist()}]}
        try:
            results[i] = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
        except httpx.HTTPError as exc:
            results[i] = exc

    threads = sigterm_with_requests_in_flight(srv, call, len(xs))
    for t in threads:
        t.join(60)
    code = srv.proc.wait(30)
    output = srv.output()
    srv.stop()
    lost = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert lost == [], output
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32), expected(x)[0])
    assert code in (0, -signal.SIGTERM), output  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert "draining" in output and "stopped" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/v2/health/live", timeout=2)
