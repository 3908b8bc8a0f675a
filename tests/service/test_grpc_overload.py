"""Overload, timeouts and cancellation over gRPC, in-process: the real app, lifespan, batcher and gRPC server on a
free port, Triton's asyncio gRPC client; the engine is the exact fake (y = 2x + 1) behind a gate, so the test
decides when a batch may finish."""

import asyncio
import contextlib
import threading

import numpy as np
import pytest
from prometheus_client import generate_latest

from service.app import create_app
from service.settings import Settings
from tests.process import free_port
from tests.service.fakes import POISON, AffineEngine
from tests.service.repo_builder import MODEL
from tests.service.test_overload import until

pytestmark = pytest.mark.timeout(60)


def gated_app(test_repo, gate, engines, **settings):
    def loader(repo, model, variant, backend, **options):
        engine = AffineEngine(gate=gate).load()
        engines.append(engine)
        return engine

    settings = Settings(repo=test_repo, grpc_port=free_port(), warmup_batch_sizes=[], **settings)
    return create_app(settings, loader=loader)


@contextlib.asynccontextmanager
async def one_call_running(app, gate, engines):
    """The app serving (warmed up through the open gate), then the gate closed and one call (value 1) blocked in
    the engine: yields (the default variant's batcher, an asyncio gRPC client, that call's future)."""
    from tritonclient.grpc.aio import InferenceServerClient

    gate.set()
    async with app.router.lifespan_context(app):
        gate.clear()
        for engine in engines:
            engine.entered.clear()  # warm-up entered them
        client = InferenceServerClient(f"127.0.0.1:{app.state.settings.grpc_port}")
        running = infer(client, 1)
        await until(lambda: any(e.entered.is_set() for e in engines))  # running, blocked on the gate
        yield app.state.repo.get(MODEL).batcher, client, running
        await client.close()


def served(engines):
    return sorted(v for e in engines for v in e.seen if v != 0.0)  # 0.0: warm-up rows


async def outcome(call):
    """("OK", first value of y) or (the gRPC status name, message) of an awaited client call."""
    from tritonclient.grpc import InferenceServerException

    try:
        result = await call
    except InferenceServerException as exc:
        return exc.status().removeprefix("StatusCode."), exc.message()
    return "OK", float(result.as_numpy("y")[0, 0])


def infer(client, value, **kwargs):
    from tritonclient.grpc import InferInput

    x = InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return asyncio.ensure_future(outcome(client.infer(MODEL, [x], **kwargs)))


def test_queue_full_timeout_engine_failure_and_no_model_control(test_repo):
    from tritonclient.grpc import InferenceServerException

    gate, engines = threading.Event(), []
    app = gated_app(test_repo, gate, engines, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)

    async def main():
        async with one_call_running(app, gate, engines) as (batcher, client, running):
            # Triton's per-request queue timeout, microseconds; 1 s: still queued when `full` arrives (an expired
            # request frees its place at once)
            expiring = infer(client, 2, timeout=1_000_000)
            await until(lambda: batcher.depth == 1)
            queued = infer(client, 3)
            await until(lambda: batcher.depth == 2)
            full = await infer(client, 4)
            expired = await expiring  # answered while the engine is still blocked
            assert not gate.is_set()
            gate.set()
            answers = {"full": full, "expired": expired, "ok1": await running, "ok3": await queued,
                       "failed": await infer(client, POISON), "after": await infer(client, 5)}
            with pytest.raises(InferenceServerException) as load:
                await client.load_model(MODEL)
            metrics = generate_latest(app.state.metrics.registry).decode()
        return answers, load.value, metrics

    answers, load, metrics = asyncio.run(main())
    assert answers["full"][0] == "UNAVAILABLE" and "queue is full" in answers["full"][1]
    assert answers["expired"][0] == "DEADLINE_EXCEEDED" and "timeout expired" in answers["expired"][1]
    assert answers["ok1"] == ("OK", 3.0) and answers["ok3"] == ("OK", 7.0) and answers["after"] == ("OK", 11.0)
    assert answers["failed"][0] == "INTERNAL" and "poisoned batch" in answers["failed"][1]  # the engine's fault
    # model control is off (mode none): refused with how to turn it on, the model still served (`after` above)
    assert load.status() == "StatusCode.FAILED_PRECONDITION" and "--model-control-mode explicit" in load.message()
    ran = served(engines)
    assert ran == [POISON, 1.0, 3.0, 5.0], ran  # the expired (2) and the rejected (4) requests never ran
    grpc = 'model="linear",protocol="grpc",variant="affine"}'
    assert f'code="503",{grpc} 1.0' in metrics and f'code="504",{grpc} 1.0' in metrics
    assert f'code="200",{grpc} 3.0' in metrics and f'code="500",{grpc} 1.0' in metrics
    assert 'protocol="http"' not in metrics


def test_cancelled_and_past_deadline_calls_are_dropped_before_compute(test_repo):
    gate, engines = threading.Event(), []
    app = gated_app(test_repo, gate, engines, max_batch_size=1, max_queue_delay_ms=0)

    async def main():
        async with one_call_running(app, gate, engines) as (batcher, client, running):
            late = infer(client, 2, client_timeout=0.3)  # the client's gRPC deadline, seconds
            cancelled = infer(client, 3)
            await until(lambda: batcher.depth == 2)
            cancelled.cancel()  # the client goes away: the call is cancelled on the server too
            late_answer = await late
            inflight = app.state.metrics.inflight.labels(model=MODEL, variant="affine", backend="fake")
            await until(lambda: inflight._value.get() == 1)  # both handlers have finished; `running` remains
            gate.set()
            first = await running
            await until(lambda: batcher.dropped == 2)
            metrics = generate_latest(app.state.metrics.registry).decode()
        return first, late_answer, metrics

    first, late_answer, metrics = asyncio.run(main())
    assert first == ("OK", 3.0) and late_answer[0] == "DEADLINE_EXCEEDED"
    assert served(engines) == [1.0]  # neither 2 nor 3 ever reached the engine
    grpc = 'model="linear",protocol="grpc",variant="affine"}'
    assert f'code="499",{grpc} 2.0' in metrics  # the client left, or its deadline passed: both cancelled calls
    assert 'normfuse_dropped_requests_total{backend="fake",model="linear",reason="cancelled",variant="affine"} 2.0' \
        in metrics
