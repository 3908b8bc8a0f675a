"""OIP v2 over gRPC against the real `normfuse serve` process, with Triton's own client (tritonclient.grpc):
health, metadata, config, statistics and index as REST says them; inference equal to REST's; REST's error
messages under gRPC status codes; 16 concurrent clients counted in /metrics; SIGTERM under gRPC load."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.process import free_port
from tests.service.repo_builder import BROKEN, MODEL, build_test_repo, expected
from tests.service.server_process import Server, inflight, sigterm_with_requests_in_flight

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
triton = pytest.importorskip("tritonclient.grpc")


class GrpcServer(Server):
    """`normfuse serve` with gRPC on a free port (the tests' environment turns it off otherwise)."""

    def __init__(self, repo, *flags: str, env: dict[str, str] | None = None, **options) -> None:
        self.grpc_port = free_port()
        super().__init__(repo, "--grpc-port", str(self.grpc_port), *flags, env=env, **options)
        self.grpc = f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_test_repo(tmp_path_factory.mktemp("grpc") / "repo")


@pytest.fixture(scope="module")
def server(repo, request):
    srv = GrpcServer(repo, "--max-queue-delay-ms", "5", env={"NORMFUSE_MAX_BODY_BYTES": "4096"})
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture
def client(server):
    c = triton.InferenceServerClient(server.grpc)
    yield c
    c.close()


def grpc_input(x: np.ndarray, name: str = "x", datatype: str = "FP32"):
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def rest_json(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.reshape(-1).tolist()}]}


def test_health_metadata_config_statistics_and_index_say_what_rest_says(server, client):
    rest = httpx.Client(base_url=server.url, timeout=10)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "unfused")
    assert not client.is_model_ready(BROKEN) and not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "v9")
    assert client.get_server_metadata(as_json=True) == rest.get("/v2").json()
    meta, rest_meta = client.get_model_metadata(MODEL, as_json=True), rest.get(f"/v2/models/{MODEL}").json()
    for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        for t in meta[tensors]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert rest_meta.pop("parameters")["exact"] is True  # exact variants only; the proto has no such field
    assert meta == rest_meta
    for version in ("", "unfused"):
        config = client.get_model_config(MODEL, version, as_json=True)["config"]
        rest_config = rest.get(f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/config").json()
        assert config["parameters"] == rest_config["parameters"]  # the variant served, its revision, exact or not
        assert config["parameters"]["exact"] == {"string_value": "true"}
        assert (config["name"], config["platform"], config["max_batch_size"]) == (MODEL, "onnxruntime_onnx", 8)
        assert [[int(d) for d in t["dims"]] for t in config["input"]] == [t["dims"] for t in rest_config["input"]]
    assert client.get_model_repository_index(as_json=True)["models"] == rest.post("/v2/repository/index").json()
    client.infer(MODEL, [grpc_input(np.ones((3, 4), np.float32))])
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    rest_stats = rest.get(f"/v2/models/{MODEL}/stats").json()["model_stats"]
    assert [int(s.get("inference_count", 0)) for s in stats] == [s["inference_count"] for s in rest_stats]
    assert sum(int(s.get("inference_count", 0)) for s in stats) >= 3


def test_inference_equals_rest_for_the_same_input_default_and_a_version(server, client):
    import tritonclient.http as triton_http

    rest = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    x = np.arange(-12, 12, dtype=np.float32).reshape(6, 4)
    for version in ("", "unfused"):
        answer = client.infer(MODEL, [grpc_input(x)], model_version=version, request_id="g-1",
                              outputs=[triton.InferRequestedOutput("y")])
        rest_input = triton_http.InferInput("x", list(x.shape), "FP32")
        rest_input.set_data_from_numpy(x)  # binary tensors
        rest_answer = rest.infer(MODEL, [rest_input], model_version=version)
        np.testing.assert_array_equal(answer.as_numpy("y"), rest_answer.as_numpy("y"))
        np.testing.assert_array_equal(answer.as_numpy("y"), expected(x))
        response = answer.get_response()
        assert (response.model_version, response.id) == (version or "affine", "g-1")
        assert response.model_version == rest_answer.get_response()["model_version"]
    rest.close()


def test_typed_contents_are_read_like_json_data(server):
    """Inputs in typed `contents` (not raw bytes), as clients other than tritonclient send them."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        y = np.frombuffer(response.raw_output_contents[0], "<f4").reshape([int(d) for d in response.outputs[0].shape])
        np.testing.assert_array_equal(y, expected(x))
        request.inputs[0].datatype = "INT32"  # FP32 values in the INT32 datatype's field? No: the wrong field
        with pytest.raises(grpc.RpcError) as wrong_field:
            stub.ModelInfer(request, timeout=30)
    assert wrong_field.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INT32 values go in contents.int_contents, got fp32_contents" in wrong_field.value.details()


def grpc_error(client, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer(*args, **kwargs)
    return info.value.status().removeprefix("StatusCode."), info.value.message()


@pytest.mark.parametrize("name, datatype, x", [
    ("x", "INT32", np.ones((2, 4), np.int32)),      # wrong datatype
    ("x", "FP32", np.ones((2, 5), np.float32)),     # wrong shape
    ("z", "FP32", np.ones((2, 4), np.float32)),     # unknown input name
], ids=["datatype", "shape", "name"])
def test_bad_input_is_invalid_argument_with_the_rest_message(server, client, name, datatype, x):
    status, message = grpc_error(client, MODEL, [grpc_input(x, name, datatype)])
    rest = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=rest_json(x, name, datatype), timeout=10)
    assert rest.status_code == 400
    assert (status, message) == ("INVALID_ARGUMENT", rest.json()["error"])


def test_unknown_model_or_version_is_not_found_and_nothing_bad_is_internal(server, client):
    x = np.ones((1, 4), np.float32)
    for model, version in (("nope", ""), (MODEL, "v9")):
        status, message = grpc_error(client, model, [grpc_input(x)], model_version=version)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        rest = httpx.post(f"{server.url}{path}", json=rest_json(x), timeout=10)
        assert (rest.status_code, status, message) == (404, "NOT_FOUND", rest.json()["error"])
    status, message = grpc_error(client, MODEL, [grpc_input(x)], outputs=[triton.InferRequestedOutput("w")])
    assert status == "INVALID_ARGUMENT" and "unknown output(s) ['w']" in message
    status, message = grpc_error(client, MODEL, [grpc_input(x)], timeout=-5)  # a negative queue timeout
    assert status == "INVALID_ARGUMENT" and "parameter 'timeout'" in message
    # larger than max_body_bytes (4096 here): refused by gRPC's own message limit, not by a crash
    status, message = grpc_error(client, MODEL, [grpc_input(np.ones((300, 4), np.float32))])
    assert status == "RESOURCE_EXHAUSTED" and "4096" in message
    assert client.is_server_ready()


def test_overload_and_timeouts_over_grpc_lose_nothing(repo):
    """UNAVAILABLE past the in-flight limit, DEADLINE_EXCEEDED for the request's own queue timeout and for the
    client's deadline (that request dropped before compute); the call that was admitted is answered."""
    srv = GrpcServer(repo, "--max-queue-delay-ms", "2000", "--max-inflight", "1")  # a call waits 2 s for company
    try:
        x = np.full((1, 4), 7, np.float32)
        with triton.InferenceServerClient(srv.grpc) as c:
            timed_out = grpc_error(c, MODEL, [grpc_input(x)], timeout=100_000)  # 0.1 s in the queue, microseconds
            late = grpc_error(c, MODEL, [grpc_input(x)], client_timeout=0.3)  # the client's gRPC deadline
        admitted: list[object] = []
        thread = threading.Thread(target=lambda: admitted.append(
            triton.InferenceServerClient(srv.grpc).infer(MODEL, [grpc_input(x)]).as_numpy("y")))
        thread.start()
        deadline = time.monotonic() + 20
        while inflight(srv.url) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with triton.InferenceServerClient(srv.grpc) as c:
            refused = grpc_error(c, MODEL, [grpc_input(x)])
        thread.join(30)
        dropped = grpc_series(srv.url, "normfuse_dropped_requests_total", code=None, protocol=None)
    finally:
        srv.stop()
    assert timed_out[0] == "DEADLINE_EXCEEDED" and "timeout expired" in timed_out[1]
    assert late[0] == "DEADLINE_EXCEEDED"
    assert refused[0] == "UNAVAILABLE" and "in flight" in refused[1]
    np.testing.assert_array_equal(admitted[0], expected(x))
    assert dropped == 2  # neither the timed-out nor the late request reached the engine


def grpc_series(url: str, family: str, code: str | None = "200", protocol: str | None = "grpc") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = [f'model="{MODEL}"'] + ([f'protocol="{protocol}"'] if protocol else []) + ([f'code="{code}"'] if code else [])
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(family + "{") and all(w in line for w in wanted))


def test_sixteen_concurrent_clients_are_answered_and_counted_in_metrics(server):
    before = grpc_series(server.url, "normfuse_requests_total")
    durations = grpc_series(server.url, "normfuse_request_duration_seconds_count", code=None)
    wrong: list[str] = []

    def calls(i: int) -> None:
        c = triton.InferenceServerClient(server.grpc)
        for k in range(5):
            x = np.full((1 + k % 3, 4), 100 * i + k, np.float32)
            try:
                y = c.infer(MODEL, [grpc_input(x)]).as_numpy("y")
                if not np.array_equal(y, expected(x)):
                    wrong.append(f"client {i} call {k}: {y.tolist()}")
            except triton.InferenceServerException as exc:
                wrong.append(f"client {i} call {k}: {exc}")
        c.close()

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == []
    assert grpc_series(server.url, "normfuse_requests_total") - before == 80
    assert grpc_series(server.url, "normfuse_request_duration_seconds_count", code=None) - durations == 80
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'normfuse_requests_total{{backend="onnxruntime",code="400",model="{MODEL}",protocol="grpc"' in text


def test_sigterm_under_grpc_load_answers_every_accepted_call_and_refuses_new_ones(repo):
    # a long batching window: accepted calls (6 rows, the batch takes 8) wait in the batcher's queue for 2 s
    srv = GrpcServer(repo, "--max-queue-delay-ms", "2000", "--max-batch-size", "8")
    try:
        results, refused, code = sigterm_under_load(srv, [np.full((1, 4), i, np.float32) for i in range(6)])
    finally:
        output = srv.output()
        srv.stop()
    assert refused.status() == "StatusCode.UNAVAILABLE", refused
    lost = [r for r in results.values() if not isinstance(r, np.ndarray)]
    assert lost == [], output
    for i, y in results.items():
        np.testing.assert_array_equal(y, expected(np.full((1, 4), i, np.float32)))
    assert code in (0, -signal.SIGTERM), output
    assert "draining" in output and "stopped" in output


def sigterm_under_load(srv: GrpcServer, xs: list[np.ndarray]):
    """Calls in flight, then SIGTERM, then one more call: (answers by index, the late call's error, exit code)."""
    results: dict[int, object] = {}

    def call(i: int) -> None:
        c = triton.InferenceServerClient(srv.grpc)
        try:
            results[i] = c.infer(MODEL, [grpc_input(xs[i])], client_timeout=60).as_numpy("y")
        except triton.InferenceServerException as exc:
            results[i] = exc
        c.close()

    threads = sigterm_with_requests_in_flight(srv, call, len(xs))
    while "draining" not in srv.output() and srv.proc.poll() is None:
        time.sleep(0.02)
    late = triton.InferenceServerClient(srv.grpc)
    with pytest.raises(triton.InferenceServerException) as refused:  # no new calls once shutdown began
        late.infer(MODEL, [grpc_input(xs[0])], client_timeout=10)
    late.close()
    for t in threads:
        t.join(60)
    return results, refused.value, srv.proc.wait(30)


# -- model control over gRPC (issue 17's repository API, RepositoryModelLoad/Unload) ------------------------------
def grpc_index(client) -> list[dict]:
    """The repository index over gRPC, as REST writes it (protobuf's JSON leaves out empty strings)."""
    rows = client.get_model_repository_index(as_json=True).get("models", [])
    return [{"name": r["name"], "version": r.get("version", ""), "state": r["state"],
             **({"reason": r["reason"]} if r.get("reason") else {})} for r in rows]


def control_error(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(triton.InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value.status().removeprefix("StatusCode."), info.value.message()


def test_model_control_over_grpc_is_refused_in_none_mode_with_rest_message(server, client):
    rest = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", timeout=10)
    assert rest.status_code == 400
    assert control_error(client.load_model, MODEL) == ("FAILED_PRECONDITION", rest.json()["error"])
    status, message = control_error(client.unload_model, MODEL)
    assert status == "FAILED_PRECONDITION" and "--model-control-mode explicit" in message
    assert client.is_model_ready(MODEL)  # refused, nothing unloaded


def test_explicit_load_swap_and_unload_over_grpc(repo):
    # no --load-model: explicit mode with no model loaded is live but not ready (issue 22)
    srv = GrpcServer(repo, "--model-control-mode", "explicit", ready_path="/v2/health/live")
    try:
        with triton.InferenceServerClient(srv.grpc) as c:
            rest = httpx.Client(base_url=srv.url, timeout=10)
            assert not c.is_server_ready() and not c.is_model_ready(MODEL)
            index = grpc_index(c)
            assert index == rest.post("/v2/repository/index").json()
            assert {"name": MODEL, "version": "", "state": "UNAVAILABLE",
                    "reason": f"load it with POST /v2/repository/models/{MODEL}/load"} in index

            c.load_model(MODEL)
            assert c.is_model_ready(MODEL)
            assert {"name": MODEL, "version": "affine", "state": "READY"} in grpc_index(c)
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            np.testing.assert_array_equal(c.infer(MODEL, [grpc_input(x)]).as_numpy("y"), expected(x))
            answered, failures = swaps_under_grpc_load(srv.grpc, c, swaps=3)
            assert failures == [] and answered > 0, failures[:5]
            closed = f"model {MODEL}: revision {revision(rest)} closed"  # each swap retires the one it replaced
            deadline = time.monotonic() + 30
            while srv.output().count(closed) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.output().count(closed) == 3

            c.unload_model(MODEL)
            assert not c.is_model_ready(MODEL) and not c.is_server_ready()  # explicit mode, no model: not ready
            assert {"name": MODEL, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"} in grpc_index(c)
            status, message = control_error(c.unload_model, MODEL)
            assert status == "FAILED_PRECONDITION" and "not loaded" in message
            status, message = control_error(c.load_model, "nope")
            assert status == "NOT_FOUND" and str(repo) in message
            status, message = control_error(c.load_model, BROKEN)
            assert status == "FAILED_PRECONDITION" and "failed to load" in message
            status, message = control_error(c.load_model, MODEL, config="{}")
            assert status == "INVALID_ARGUMENT" and "not supported" in message
            assert not c.is_model_ready(MODEL)  # a refused load loads nothing
    finally:
        srv.stop()


def revision(rest: httpx.Client) -> str:
    return rest.get(f"/v2/models/{MODEL}/config").json()["parameters"]["revision"]["string_value"]


def swaps_under_grpc_load(address: str, control, swaps: int) -> tuple[int, list[str]]:
    """`swaps` reloads (zero-downtime swaps) of MODEL while 2 threads send gRPC calls (bounded): (calls answered,
    what failed)."""
    stop, failures, answered = threading.Event(), [], [0, 0]

    def calls(i: int) -> None:
        with triton.InferenceServerClient(address) as c:
            for k in range(2000):
                if stop.is_set():
                    return
                x = np.full((1, 4), 10 * i + k % 10, np.float32)
                try:
                    y = c.infer(MODEL, [grpc_input(x)], client_timeout=30).as_numpy("y")
                    if not np.array_equal(y, expected(x)):
                        failures.append(f"wrong answer {y.tolist()}")
                    answered[i] += 1
                except triton.InferenceServerException as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(swaps):
            control.load_model(MODEL)  # the same files again: a new revision built, swapped in, the old drained
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return sum(answered), failures
