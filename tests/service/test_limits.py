"""The limits of the inference call (issue 22), in-process with the real app, batcher and error table: a GPT-2-shaped
answer refused before compute, declared shapes checked before any tensor is decoded, no 500 from client input,
and explicit mode with nothing loaded not ready."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from engines.base import Engine, TensorSpec
from oip.codec import MAX_DIMS
from service.app import create_app
from service.settings import Settings
from tests.service.repo_builder import MODEL

pytestmark = pytest.mark.timeout(120)
VOCAB = 50257


class LogitsEngine(Engine):
    """input_ids (-1, -1) INT64 -> logits (-1, -1, VOCAB) FP32, as a GPT-2 language model; records each run."""

    backend = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[int, ...]] = []

    def load(self) -> LogitsEngine:
        self._inputs = [TensorSpec("input_ids", "INT64", (-1, -1))]
        self._outputs = [TensorSpec("logits", "FP32", (-1, -1, VOCAB))]
        return self

    def _run(self, inputs):
        ids = inputs["input_ids"]
        if ids.shape[1] > 1:  # warm-up runs are (rows, 1)
            self.runs.append(ids.shape)
        return {"logits": np.zeros((*ids.shape, VOCAB), np.float32)}


def serve(test_repo, engines, **settings):
    def loader(*args, **options):
        engines.append(LogitsEngine().load())
        return engines[-1]

    return create_app(Settings(repo=test_repo, warmup_batch_sizes=[], **settings), loader=loader)


async def post_all(app, bodies):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post(f"/v2/models/{MODEL}/infer", content=b) for b in bodies]


def ids(tokens: int, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input_ids", "shape": [1, tokens], "datatype": "INT64",
                                   "data": [464] * tokens}], **extra}).encode()


def test_a_1024_token_json_answer_is_refused_before_compute_with_a_hint(test_repo):
    engines = []
    app = serve(test_repo, engines)
    json_answer, binary_answer, small = asyncio.run(post_all(app, [
        ids(1024), ids(1024, parameters={"binary_data_output": True}), ids(2)]))
    assert json_answer.status_code == 413, json_answer.text
    error = json_answer.json()["error"]
    # names the output, its shape, its size in the requested encoding, the limit, and how to get it
    assert "'logits'" in error and "[1, 1024, 50257]" in error and "JSON" in error
    assert str(Settings.model_fields["max_json_response_bytes"].default) in error and "binary" in error
    assert binary_answer.status_code == 200  # 206 MB as binary: under max_response_bytes (256 MiB)
    assert small.status_code == 200 and len(small.json()["outputs"][0]["data"]) == 2 * VOCAB
    assert [shape for e in engines for shape in e.runs] == [(1, 1024), (1, 2)]  # the refused one never ran


def test_max_response_bytes_refuses_binary_answers_too(test_repo):
    engines = []
    app = serve(test_repo, engines, max_response_bytes=1 << 20)
    (answer,) = asyncio.run(post_all(app, [ids(8, parameters={"binary_data_output": True})]))
    assert answer.status_code == 413
    assert f"would be {8 * VOCAB * 4} bytes as binary" in answer.json()["error"]
    assert "max_response_bytes" in answer.json()["error"] and not any(e.runs for e in engines)


@pytest.mark.parametrize("body, status, words", [
    # a shape past numpy's dimensions (32 in numpy 1, 64 in numpy 2): 400, not the reshape's ValueError as a 500
    ({"inputs": [{"name": "input_ids", "shape": [1] * 65, "datatype": "INT64", "data": [1]}]}, 400,
     f"at most {MAX_DIMS}"),
    # a huge declared shape with no data: refused from the header (wrong rank) before anything is decoded
    ({"inputs": [{"name": "input_ids", "shape": [1, 2**20, 2**20], "datatype": "INT64", "data": [1]}]},
     400, "wrong number of dimensions"),
    # more inputs than the model has
    ({"inputs": [{"name": f"i{k}", "shape": [1, 1], "datatype": "INT64", "data": [1]} for k in range(5)]}, 400,
     "unknown input(s) ['i0', 'i1', 'i2', 'i3', 'i4']"),
    # the right name, the wrong datatype: refused before the 10,000 values are converted
    ({"inputs": [{"name": "input_ids", "shape": [1, 10_000], "datatype": "FP32", "data": [0.5] * 10_000}]}, 400,
     "wrong datatype"),
])
def test_declared_inputs_are_checked_before_decoding(test_repo, body, status, words):
    engines = []
    (answer,) = asyncio.run(post_all(serve(test_repo, engines), [json.dumps(body).encode()]))
    assert answer.status_code == status and words in answer.json()["error"], answer.text


def test_deep_json_on_every_route_is_a_400(test_repo):
    deep = b"[" * 100_000 + b"]" * 100_000

    async def main():
        app = serve(test_repo, [], model_control_mode="explicit", load_model=[MODEL])
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return [await c.post(path, content=deep) for path in
                        (f"/v2/models/{MODEL}/infer", "/v2/repository/index", f"/v2/repository/models/{MODEL}/load")]

    for answer in asyncio.run(main()):
        assert answer.status_code in (400, 413), answer.text  # 413: over max_control_body_bytes (64 KiB)


def test_control_routes_take_small_bodies_only(test_repo):
    async def main():
        app = serve(test_repo, [], model_control_mode="explicit", load_model=[MODEL], max_control_body_bytes=1024)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/v2/repository/index", content=b'{"ready": true, "pad": "' + b"x" * 2000 + b'"}')

    answer = asyncio.run(main())
    assert answer.status_code == 413 and "1024" in answer.json()["error"]


def test_explicit_mode_with_no_model_loaded_is_not_ready_until_a_load(test_repo):
    async def main():
        app = serve(test_repo, [], model_control_mode="explicit")
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                before = await c.get("/v2/health/ready")
                assert (await c.post(f"/v2/repository/models/{MODEL}/load")).status_code == 200
                after = await c.get("/v2/health/ready")
                assert (await c.post(f"/v2/repository/models/{MODEL}/unload")).status_code == 200
                await app.state.control.retired()
                return before, after, await c.get("/v2/health/ready")

    before, after, unloaded = asyncio.run(main())
    assert before.status_code == 503 and "no model is loaded" in before.json()["error"]
    assert after.status_code == 200 and unloaded.status_code == 503


def test_requests_holding_a_drained_revision_get_503_with_retry_after(test_repo):
    """A reload swaps in a new revision while the old one holds a running and a queued request; past the drain
    timeout both are answered 503 + Retry-After (not a closed engine's 500), and new requests get the new one."""
    import threading

    from tests.service.fakes import AffineEngine

    gate, first = threading.Event(), []

    def loader(*args, **options):
        engine = AffineEngine(gate=gate if len(first) < 2 else None).load()  # the first revision's two variants
        first.append(engine)
        return engine

    def x(value):
        return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}

    async def main():
        settings = Settings(repo=test_repo, warmup_batch_sizes=[], max_batch_size=1, drain_timeout_s=0.2,
                            model_control_mode="explicit", load_model=[MODEL])
        app = create_app(settings, loader=loader)
        gate.set()
        async with app.router.lifespan_context(app):
            gate.clear()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                url = f"/v2/models/{MODEL}/infer"
                running = asyncio.ensure_future(c.post(url, json=x(1)))
                old = app.state.repo.get(MODEL)
                while not old.batcher.busy:
                    await asyncio.sleep(0.01)
                queued = asyncio.ensure_future(c.post(url, json=x(2)))
                while old.batcher.depth < 1:
                    await asyncio.sleep(0.01)
                assert (await c.post(f"/v2/repository/models/{MODEL}/load")).status_code == 200
                after = await c.post(url, json=x(3))  # the new revision
                answers = await asyncio.gather(running, queued)
                gate.set()  # let the abandoned engine call return
                await app.state.control.retired()
                with pytest.raises(Exception) as refused:
                    async with old.revision.lease():
                        pass
        return answers, after, refused.value

    answers, after, refused = asyncio.run(main())
    assert after.status_code == 200 and after.json()["outputs"][0]["data"] == [7.0] * 4
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    from service.errors import status_of

    assert status_of(refused) == (503, {"Retry-After": "1"}) and "being replaced or unloaded" in str(refused)


def test_grpc_calls_beyond_max_grpc_rpcs_are_refused(test_repo):
    import threading

    from tests.service.test_grpc_overload import gated_app, infer, one_call_running

    gate, engines = threading.Event(), []
    app = gated_app(test_repo, gate, engines, max_grpc_rpcs=1, max_batch_size=1)

    async def main():
        async with one_call_running(app, gate, engines) as (_, client, running):
            refused = await infer(client, 2)
            gate.set()
            return refused, await running

    refused, first = asyncio.run(main())
    assert refused[0] == "RESOURCE_EXHAUSTED" and first == ("OK", 3.0)


def test_bodies_being_received_are_bounded_in_bytes_apart_from_max_inflight(test_repo):
    async def main():
        app = serve(test_repo, [], max_receiving_bytes=4096)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                big = await c.post(f"/v2/models/{MODEL}/infer", content=ids(1000))
                small = await c.post(f"/v2/models/{MODEL}/infer", content=ids(2))
                return big, small, app.state.admission.receiving

    big, small, receiving = asyncio.run(main())
    assert big.status_code == 503 and big.headers["retry-after"] == "1"
    assert "max_receiving_bytes" in big.json()["error"]
    assert small.status_code == 200 and receiving == 0  # every byte held was given back


def test_the_limits_are_reported_in_the_model_configuration(test_repo):
    async def main():
        app = serve(test_repo, [], max_response_bytes=12345)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return (await c.get(f"/v2/models/{MODEL}/config")).json()["parameters"]

    parameters = asyncio.run(main())
    assert parameters["max_response_bytes"] == {"string_value": "12345"}
    assert parameters["max_json_response_bytes"] == {"string_value": str(16 << 20)}
    assert {"max_body_bytes", "max_inflight", "body_timeout_s", "min_upload_bytes_per_s"} <= set(parameters)
