"""The app in-process (ASGI transport, lifespan driven by hand) against a real ONNX Runtime repository."""

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.repo_builder import BROKEN, MODEL, expected

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def serving(repo, **overrides):
    settings = Settings(repo=repo, **{"max_queue_delay_ms": 20, **overrides})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app


def run(coro):
    return asyncio.run(coro)


def infer_body(x, **extra):
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
            **extra}


def test_health_metadata_and_readiness(test_repo):
    async def main():
        async with serving(test_repo) as (c, _):
            assert (await c.get("/v2/health/live")).status_code == 200
            assert (await c.get("/v2/health/ready")).json() == {"ready": True}
            meta = (await c.get("/v2")).json()
            assert "binary_tensor_data" in meta["extensions"] and meta["name"] == "normfuse"
            model = (await c.get(f"/v2/models/{MODEL}")).json()
            assert model["versions"] == ["unfused", "affine"]
            assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
            assert (await c.get(f"/v2/models/{MODEL}/versions/unfused/ready")).status_code == 200
            broken = await c.get(f"/v2/models/{BROKEN}/ready")
            assert broken.status_code == 503 and "protobuf parsing failed" in broken.json()["error"].lower()
            index = (await c.post("/v2/repository/index", json={})).json()
            states = {(r["name"], r["version"]): r["state"] for r in index}
            assert states == {(BROKEN, "unfused"): "UNAVAILABLE", (MODEL, "unfused"): "READY",
                              (MODEL, "affine"): "READY"}
            config = (await c.get(f"/v2/models/{MODEL}/config")).json()
            assert config["max_batch_size"] == 8 and config["platform"] == "onnxruntime_onnx"
            assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
            assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
            # what actually serves it: ONNX Runtime on the CPU, from this variant's model.onnx
            assert config["backend"] == "onnxruntime" and config["instance_group"][0]["kind"] == "KIND_CPU"
            assert config["default_model_filename"] == "model.onnx"
            assert config["parameters"]["model_file"] == {"string_value": f"{MODEL}/affine/model.onnx"}
            stats = (await c.get(f"/v2/models/{MODEL}/stats")).json()["model_stats"][0]["inference_stats"]
            assert set(stats) == {"success", "fail", "queue", "compute_infer"}  # nothing reported unmeasured

    run(main())


def test_json_infer_is_exact_echoes_id_and_sets_timing_headers(test_repo):
    async def main():
        async with serving(test_repo) as (c, _):
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            r = await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x, id="req-7"))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == "req-7" and body["model_version"] == "affine"  # the default variant
            out = body["outputs"][0]
            assert out["name"] == "y" and out["shape"] == [3, 3]
            np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(3, 3), expected(x))
            assert float(r.headers["x-queue-time"]) >= 0 and float(r.headers["x-compute-time"]) > 0
            r = await c.post(f"/v2/models/{MODEL}/versions/unfused/infer", json=infer_body(x))
            assert r.json()["model_version"] == "unfused"

    run(main())


def test_binary_round_trip(test_repo):
    async def main():
        async with serving(test_repo) as (c, _):
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            head = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": x.nbytes}}],
                               "parameters": {"binary_data_output": True}}).encode()
            r = await c.post(f"/v2/models/{MODEL}/infer", content=head + x.tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(head))})
            assert r.status_code == 200, r.text
            n = int(r.headers["inference-header-content-length"])
            meta = json.loads(r.content[:n])
            assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
            y = np.frombuffer(r.content[n:], np.float32).reshape(2, 3)
            np.testing.assert_array_equal(y, expected(x))

    run(main())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(test_repo):
    async def main():
        async with serving(test_repo, max_queue_delay_ms=50) as (c, app):
            xs = [np.full((1, 4), i, np.float32) for i in range(16)]
            rs = await asyncio.gather(*(c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x)) for x in xs))
            stats = (await c.get(f"/v2/models/{MODEL}/versions/affine/stats")).json()["model_stats"][0]
            metrics = (await c.get("/metrics")).text
            return xs, rs, stats, metrics

    xs, rs, stats, metrics = run(main())
    for x, r in zip(xs, rs, strict=True):
        assert r.status_code == 200
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32), expected(x)[0])
    assert stats["inference_count"] == 16
    assert stats["execution_count"] < 16  # batched: fewer engine runs than requests
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1
    assert 'normfuse_requests_total{backend="onnxruntime",code="200",model="linear",protocol="http",variant="affine"} 16.0' in metrics
    assert "normfuse_batch_size_bucket" in metrics and "normfuse_engine_info" in metrics


HEAD = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                               "parameters": {"binary_data_size": 32}}]}).encode()


def error(r):
    return r.status_code, r.json()["error"]


def test_every_bad_request_is_a_4xx_naming_the_problem(test_repo):
    async def main():
        async with serving(test_repo, max_body_bytes=4096) as (c, _):
            url = f"/v2/models/{MODEL}/infer"
            x = np.ones((2, 4), np.float32)
            cases = {
                "malformed": await c.post(url, content=b"{not json"),
                "schema": await c.post(url, json={"inputs": "nope"}),
                "name": await c.post(url, json={"inputs": [{**infer_body(x)["inputs"][0], "name": "z"}]}),
                "dtype": await c.post(url, json={"inputs": [{**infer_body(x)["inputs"][0], "datatype": "INT32"}]}),
                "shape": await c.post(url, json=infer_body(np.ones((2, 5), np.float32))),
                "count": await c.post(url, json={"inputs": [{**infer_body(x)["inputs"][0], "shape": [3, 4]}]}),
                "model": await c.post("/v2/models/nope/infer", json=infer_body(x)),
                "version": await c.post(f"/v2/models/{MODEL}/versions/nope/infer", json=infer_body(x)),
                "broken": await c.post(f"/v2/models/{BROKEN}/infer", json=infer_body(x)),
                "big": await c.post(url, content=b" " * 5000),
                "truncated": await c.post(url, content=HEAD + b"\0" * 8,
                                          headers={"Inference-Header-Content-Length": str(len(HEAD))}),
                "trailing": await c.post(url, content=HEAD + b"\0" * 40,
                                         headers={"Inference-Header-Content-Length": str(len(HEAD))}),
                "header": await c.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"}),
                "output": await c.post(url, json=infer_body(x, outputs=[{"name": "logits"}])),
                "timeout": await c.post(url, json=infer_body(x, parameters={"timeout": "soon"})),
            }
            return {k: error(r) for k, r in cases.items()}

    e = run(main())
    assert e["malformed"][0] == 400 and "not valid JSON" in e["malformed"][1]
    assert e["schema"][0] == 422 and "inputs" in e["schema"][1]
    assert e["name"][0] == 400 and "unknown input(s) ['z']" in e["name"][1] and "'x' FP32 (-1, 4)" in e["name"][1]
    assert e["dtype"][0] == 400 and "got INT32 (2, 4), expected FP32 (-1, 4)" in e["dtype"][1]
    assert e["shape"][0] == 400 and "dimension 1 must be 4" in e["shape"][1]
    assert e["count"][0] == 400 and "needs 12 values, data has 8" in e["count"][1]
    assert e["model"][0] == 404 and "unknown model 'nope'" in e["model"][1]
    assert e["version"][0] == 404 and "no version 'nope'" in e["version"][1]
    assert e["broken"][0] == 503 and "not ready" in e["broken"][1]
    assert e["big"][0] == 413 and "limit is 4096" in e["big"][1]
    assert e["truncated"][0] == 400 and "truncated" in e["truncated"][1]
    assert e["trailing"][0] == 400 and "8 bytes beyond" in e["trailing"][1]
    assert e["header"][0] == 400 and "only 2 bytes" in e["header"][1]
    assert e["output"][0] == 400 and "unknown output(s) ['logits']" in e["output"][1]
    assert e["timeout"][0] == 400 and "microseconds" in e["timeout"][1]


def test_a_dead_batcher_makes_its_model_not_ready(test_repo):
    async def main():
        async with serving(test_repo) as (c, app):
            assert (await c.get("/v2/health/ready")).status_code == 200
            servable = app.state.repo.get(MODEL, "affine")
            servable.batcher._worker.cancel()  # the worker dies (not by drain)
            await asyncio.sleep(0.05)
            assert (await c.get(f"/v2/models/{MODEL}/ready")).status_code == 503
            assert (await c.get("/v2/health/ready")).status_code == 503
            r = await c.post(f"/v2/models/{MODEL}/versions/affine/infer", json=infer_body(np.ones((1, 4), np.float32)))
            assert r.status_code == 503 and "batcher stopped" in r.json()["error"]
            index = {(x["name"], x["version"]): x["state"] for x in (await c.post("/v2/repository/index")).json()}
            assert index[(MODEL, "affine")] == "UNAVAILABLE" and index[(MODEL, "unfused")] == "READY"
            ok = await c.post(f"/v2/models/{MODEL}/versions/unfused/infer", json=infer_body(np.ones((1, 4), np.float32)))
            assert ok.status_code == 200

    run(main())


def test_huge_or_odd_numbers_are_400_not_500(test_repo):
    async def main():
        async with serving(test_repo) as (c, _):
            url = f"/v2/models/{MODEL}/infer"
            x = np.ones((1, 4), np.float32)

            def post(body):
                return c.post(url, content=json.dumps(body), headers={"content-type": "application/json"})

            return {
                "timeout": await post(infer_body(x, parameters={"timeout": 10**400})),
                "negative": await post(infer_body(x, parameters={"timeout": -1})),
                "dims": await post({"inputs": [{"name": "x", "shape": [0, 10**30], "datatype": "FP32", "data": []}]}),
                "product": await post({"inputs": [{"name": "x", "shape": [0, 2**31 - 1, 2**31 - 1, 4],
                                                   "datatype": "FP32", "data": []}]}),
                "digits": await c.post(url, content=b'{"inputs": [], "id": ' + b"9" * 5000 + b"}"),
            }

    e = {k: error(r) for k, r in run(main()).items()}
    assert e["timeout"][0] == 400 and "microseconds in [0, 9007199254740992]" in e["timeout"][1], e["timeout"]
    assert e["negative"][0] == 400 and "microseconds" in e["negative"][1]
    assert e["dims"][0] == 400 and "dimension above 2147483647" in e["dims"][1], e["dims"]
    assert e["product"][0] == 400 and "too large" in e["product"][1], e["product"]
    assert e["digits"][0] == 400 and "number" in e["digits"][1], e["digits"]


def test_string_flags_are_400_naming_the_field(test_repo):
    async def main():
        async with serving(test_repo) as (c, _):
            x = np.ones((1, 4), np.float32)
            infer = await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x, parameters={"binary_data_output": "false"}))
            index = await c.post("/v2/repository/index", json={"ready": "no"})
            fine = await c.post("/v2/repository/index", json={"ready": True})
            return error(infer), error(index), fine.json()

    infer, index, fine = run(main())
    assert infer[0] == 400 and "binary_data_output must be a JSON boolean" in infer[1] and "'false'" in infer[1]
    assert index[0] == 400 and "ready must be a JSON boolean" in index[1]
    assert {r["state"] for r in fine} == {"READY"}


def test_request_that_can_never_fit_the_queue_is_413_without_retry_after(test_repo):
    async def main():
        async with serving(test_repo, max_queue_size=2) as (c, _):
            r = await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(np.ones((17, 4), np.float32)))
            ok = await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(np.ones((16, 4), np.float32)))
            return r, ok

    r, ok = run(main())
    assert r.status_code == 413 and "retry-after" not in r.headers
    assert "at most 16" in r.json()["error"] and "max_queue_size 2" in r.json()["error"]
    assert ok.status_code == 200


def test_default_variant_setting_picks_what_an_unversioned_request_gets(test_repo):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    async def main():
        async with serving(test_repo) as (c, _):  # the manifest's default is the last variant, affine
            assert (await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x))).json()["model_version"] == "affine"
        async with serving(test_repo, default_variant="unfused") as (c, _):
            r = await c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x))
            assert r.status_code == 200 and r.json()["model_version"] == "unfused"
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, -1), expected(x),
                                       rtol=1e-5, atol=1e-5)
            v = await c.post(f"/v2/models/{MODEL}/versions/affine/infer", json=infer_body(x))
            assert v.json()["model_version"] == "affine"  # every variant stays reachable as a version
            assert (await c.get(f"/v2/models/{MODEL}/compare")).json()["default_variant"] == "unfused"
        async with serving(test_repo, default_variant="rmsnorm") as (c, _):  # a variant the model lacks
            assert (await c.get("/v2/health/ready")).status_code == 503
            r = await c.get(f"/v2/models/{MODEL}/ready")
            assert r.status_code == 503
            assert "NORMFUSE_DEFAULT_VARIANT / --default-variant 'rmsnorm'" in r.json()["error"] and "'unfused', 'affine'" in r.json()["error"]

    run(main())
