"""Overload and failure paths over HTTP, in-process. The engine is the exact fake (y = 2x + 1) with a gate, so
the test decides when a batch may finish; the manifest, batcher, routes and errors are the real ones."""

import asyncio
import threading

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.fakes import POISON, AffineEngine, until
from tests.service.repo_builder import MODEL

pytestmark = pytest.mark.timeout(60)


def body(value: float, **extra):
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}], **extra}



def test_queue_full_timeout_and_engine_failure(test_repo):
    gate = threading.Event()
    engines = []

    def loader(repo, model, variant, backend, **options):
        engine = AffineEngine(gate=gate).load()
        engines.append(engine)
        return engine

    async def main():
        settings = Settings(repo=test_repo, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2,
                            warmup_batch_sizes=[])
        app = create_app(settings, loader=loader)
        gate.set()  # let warm-up through
        async with app.router.lifespan_context(app):
            gate.clear()
            for engine in engines:
                engine.entered.clear()
            batcher = app.state.repo.get(MODEL).batcher
            url = f"/v2/models/{MODEL}/infer"
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                running = asyncio.ensure_future(c.post(url, json=body(1)))
                await until(lambda: any(e.entered.is_set() for e in engines))  # running, blocked on the gate
                # 1 s: still queued when `full` arrives (an expired request frees its place at once)
                expiring = asyncio.ensure_future(c.post(url, json=body(2, parameters={"timeout": 1_000_000})))
                await until(lambda: batcher.depth == 1)
                queued = asyncio.ensure_future(c.post(url, json=body(3)))
                await until(lambda: batcher.depth == 2)
                full = await c.post(url, json=body(4))
                expired = await expiring  # answered while the engine is still blocked
                assert not gate.is_set()
                gate.set()
                ok1, ok3 = await running, await queued
                failed = await c.post(url, json=body(POISON))
                after = await c.post(url, json=body(5))
                metrics = (await c.get("/metrics")).text
        return full, expired, ok1, ok3, failed, after, metrics

    full, expired, ok1, ok3, failed, after, metrics = asyncio.run(main())
    assert full.status_code == 503 and full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]
    # the request's own timeout is not the server's overload: 504, no Retry-After
    assert expired.status_code == 504 and "timeout expired" in expired.json()["error"]
    assert "retry-after" not in expired.headers
    assert ok1.json()["outputs"][0]["data"] == [3.0] * 4 and ok3.json()["outputs"][0]["data"] == [7.0] * 4
    assert failed.status_code == 500 and "poisoned batch" in failed.json()["error"]
    assert after.status_code == 200 and after.json()["outputs"][0]["data"] == [11.0] * 4
    ran = sorted(v for e in engines for v in e.seen if v != 0.0)  # 0.0: warm-up rows
    assert ran == [POISON, 1.0, 3.0, 5.0], ran  # the expired (2) and the rejected (4) requests never ran
    assert 'normfuse_dropped_requests_total{backend="fake",model="linear",reason="expired",variant="affine"} 1.0' in metrics
    assert 'code="503",model="linear",protocol="http",variant="affine"} 1.0' in metrics
    assert 'code="504",model="linear",protocol="http",variant="affine"} 1.0' in metrics


def test_every_variant_is_warmed_up_at_every_configured_batch_size_before_ready(test_repo):
    engines = {}

    def loader(repo, model, variant, backend, **options):
        engines[model, variant] = AffineEngine().load()
        return engines[model, variant]

    async def main():
        settings = Settings(repo=test_repo, max_batch_size=8, warmup_batch_sizes=[1, 2], preferred_batch_sizes=[4])
        app = create_app(settings, loader=loader)
        assert app.state.ready is False
        async with app.router.lifespan_context(app):
            assert app.state.ready is True
            warmed = {key: list(engine.batches) for key, engine in engines.items()}
        assert app.state.ready is False  # not ready once shutdown began
        return warmed

    warmed = asyncio.run(main())
    # the fake loader loads even the corrupt model: warm-up covers every servable variant of every model
    assert warmed == {("linear", "unfused"): [1, 2, 4, 8], ("linear", "affine"): [1, 2, 4, 8],
                      ("broken", "unfused"): [1, 2, 4, 8]}
