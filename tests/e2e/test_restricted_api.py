"""`--restricted-api` against the real `normfuse serve` process, over REST (httpx, tritonclient.http) and gRPC
(tritonclient.grpc): a restricted group answers 403 / PERMISSION_DENIED naming the header without it or with a
wrong key, and works with it; open groups need nothing; the key never reaches the log or an answer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.e2e.test_grpc import GrpcServer
from tests.service.repo_builder import MODEL, build_test_repo, expected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
triton_grpc = pytest.importorskip("tritonclient.grpc")
triton_http = pytest.importorskip("tritonclient.http")

KEY, STATS_KEY = "repo-key-0123456789abcdef", "stats-key=with:colon"
HEADER, STATS_HEADER = "x-normfuse-repository-key", "x-stats-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    repo = build_test_repo(tmp_path_factory.mktemp("restricted") / "repo")
    srv = GrpcServer(repo, "--model-control-mode", "explicit", "--load-model", MODEL, "--log-level", "debug",
                     "--restricted-api", f"model-repository:{HEADER.upper()}={KEY}",  # the header's case is free
                     "--restricted-api", f"statistics,model-config:{STATS_HEADER}={STATS_KEY}")
    request.addfinalizer(srv.stop)
    return srv


def x_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.parametrize("headers", [{}, {HEADER: "wrong"}, {HEADER: KEY[:-1]}, {STATS_HEADER: KEY}])
def test_rest_repository_api_refuses_without_its_key(server, headers):
    for method, path in [("POST", "/v2/repository/index"), ("POST", f"/v2/repository/models/{MODEL}/unload"),
                         ("POST", f"/v2/repository/models/{MODEL}/load"), ("GET", "/v2/repository/index")]:
        answer = httpx.request(method, server.url + path, headers=headers, json={}, timeout=10)
        assert answer.status_code == 403, (path, answer.text)
        assert HEADER in answer.json()["error"] and "model-repository" in answer.json()["error"]
        assert KEY not in answer.text
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=10).status_code == 200  # nothing unloaded


def test_rest_with_the_key_and_open_groups(server):
    index = httpx.post(f"{server.url}/v2/repository/index", headers={HEADER: KEY}, json={}, timeout=10)
    assert index.status_code == 200 and {"name": MODEL, "version": "affine", "state": "READY"} in index.json()
    # header names are case-insensitive in HTTP; the value is compared exactly
    assert httpx.post(f"{server.url}/v2/repository/index", headers={"X-Normfuse-Repository-Key": KEY},
                      timeout=10).status_code == 200
    assert httpx.post(f"{server.url}/v2/repository/index", headers={HEADER: KEY.upper()},
                      timeout=10).status_code == 403
    # a second spec, its own header, a key holding ':' and '='
    assert httpx.get(f"{server.url}/v2/models/stats", timeout=10).status_code == 403
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/config", headers={HEADER: KEY}, timeout=10).status_code == 403
    assert httpx.get(f"{server.url}/v2/models/stats", headers={STATS_HEADER: STATS_KEY}, timeout=10).status_code == 200
    # open: health, metadata, inference, metrics
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    answer = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=x_body(x), timeout=10)
    assert answer.status_code == 200
    assert np.array_equal(np.array(answer.json()["outputs"][0]["data"]).reshape(2, 3), expected(x))
    for path in ("/v2/health/ready", "/v2/health/live", "/v2", f"/v2/models/{MODEL}", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path


def test_tritonclient_http_unloads_only_with_the_header(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        with pytest.raises(triton_http.InferenceServerException) as refused:
            client.unload_model(MODEL)
        assert refused.value.status() == "403" and HEADER in refused.value.message()
        assert client.is_model_ready(MODEL)
        client.unload_model(MODEL, headers={HEADER: KEY})
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL, headers={HEADER: KEY})
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def grpc_refusal(call) -> tuple[str, str]:
    with pytest.raises(triton_grpc.InferenceServerException) as info:
        call()
    return info.value.status().removeprefix("StatusCode."), info.value.message()


def test_grpc_repository_api_needs_the_metadata_key(server):
    client = triton_grpc.InferenceServerClient(server.grpc)
    try:
        for headers in (None, {HEADER: "wrong"}, {STATS_HEADER: STATS_KEY}):
            for call, args in ((client.get_model_repository_index, ()), (client.unload_model, (MODEL,)),
                               (client.load_model, (MODEL,))):
                status, message = grpc_refusal(lambda: call(*args, headers=headers))  # noqa: B023 - called at once
                assert status == "PERMISSION_DENIED" and HEADER in message and KEY not in message
        assert client.is_model_ready(MODEL)
        status, _ = grpc_refusal(lambda: client.get_inference_statistics(MODEL))
        assert status == "PERMISSION_DENIED"
        assert client.get_inference_statistics(MODEL, headers={STATS_HEADER: STATS_KEY})
        status, message = grpc_refusal(lambda: client.get_model_config(MODEL))
        assert status == "PERMISSION_DENIED" and STATS_HEADER in message

        models = client.get_model_repository_index(headers={HEADER: KEY}, as_json=True)["models"]
        assert {"name": MODEL, "version": "affine", "state": "READY"} in models
        client.unload_model(MODEL, headers={HEADER: KEY})
        assert not client.is_model_ready(MODEL)  # health is open
        client.load_model(MODEL, headers={HEADER: KEY})
        assert client.is_model_ready(MODEL) and client.is_server_live() and client.get_server_metadata()
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        inp = triton_grpc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(MODEL, [inp]).as_numpy("y"), expected(x))  # inference is open
    finally:
        client.close()


def test_the_keys_never_reach_the_log(server):
    httpx.post(f"{server.url}/v2/repository/index", headers={HEADER: KEY}, timeout=10)
    httpx.post(f"{server.url}/v2/repository/index", headers={HEADER: "a-wrong-guess"}, timeout=10)
    log = server.output()
    assert "ready" in log and KEY not in log and STATS_KEY not in log and "a-wrong-guess" not in log
