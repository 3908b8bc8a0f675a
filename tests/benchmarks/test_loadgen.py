"""The load generator against a real server process (the plain FastAPI peer) on loopback."""

import asyncio

import numpy as np
import pytest

from benchmarks import loadgen
from benchmarks.peers import launch

SPECS = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


def test_poisson_schedule_is_bounded_and_has_the_right_rate():
    offsets = loadgen.poisson_schedule(200.0, 10_000, 5.0, seed=1)
    assert offsets.max() < 5.0 and np.all(np.diff(offsets) > 0)
    assert 800 < offsets.size < 1200  # 1000 expected
    assert loadgen.poisson_schedule(1000.0, 7, 100.0).size == 7
    with pytest.raises(ValueError):
        loadgen.poisson_schedule(0, 1, 1)


def test_infer_url():
    assert loadgen.infer_url("http://h:1/", "m") == "http://h:1/v2/models/m/infer"
    assert loadgen.infer_url("http://h:1", "m", "rmsnorm") == "http://h:1/v2/models/m/versions/rmsnorm/infer"


def test_connection_refused_is_counted_not_raised():
    port = launch.free_port()
    target = loadgen.make_target(f"http://127.0.0.1:{port}", "m", SPECS)
    result = asyncio.run(loadgen.closed_loop(target, 2, max_requests=4, max_seconds=5, warmup=0))
    assert result.codes() == {"connect-error": 4}
    assert result.throughput == 0


@pytest.fixture(scope="module")
def plain_server(tiny_onnx, tmp_path_factory):
    with launch.start("plain", log_dir=tmp_path_factory.mktemp("logs"), onnx=str(tiny_onnx), model="tiny",
                      threads=1) as server:
        yield server


@pytest.mark.e2e
@pytest.mark.parametrize("binary", [False, True])
def test_closed_loop_is_bounded_by_count(plain_server, binary):
    target = loadgen.make_target(plain_server.base_url, "tiny", SPECS, binary=binary, batch=3, label="plain")
    result = asyncio.run(loadgen.closed_loop(target, 4, max_requests=40, max_seconds=30))
    assert len(result.samples) == 40
    assert result.codes() == {"200": 40}
    summary = result.to_dict()
    assert summary["items_per_s"] == pytest.approx(3 * summary["throughput_rps"])
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]


@pytest.mark.e2e
def test_closed_loop_is_bounded_by_time(plain_server):
    target = loadgen.make_target(plain_server.base_url, "tiny", SPECS)
    result = asyncio.run(loadgen.closed_loop(target, 2, max_requests=10**6, max_seconds=0.5))
    assert 0 < len(result.samples) < 10**6
    assert result.duration_s < 10


@pytest.mark.e2e
def test_open_loop_sends_the_schedule_and_reports_errors(plain_server):
    target = loadgen.make_target(plain_server.base_url, "tiny", SPECS, binary=True)
    result = asyncio.run(loadgen.open_loop(target, 50.0, max_requests=30, max_seconds=10, seed=3))
    assert len(result.samples) == 30 and result.codes() == {"200": 30}
    # latency counts from the scheduled time, which is never after the real send
    assert all(s.latency > 0 for s in result.samples)
    wrong = loadgen.make_target(plain_server.base_url, "nope", SPECS)
    result = asyncio.run(loadgen.open_loop(wrong, 50.0, max_requests=5, max_seconds=10))
    assert result.codes() == {"404": 5} and result.throughput == 0


@pytest.mark.e2e
def test_open_loop_cancels_what_outlives_the_timeout(plain_server):
    # a 1 ms cap is shorter than any JSON round trip of a batch of 512 through Python on loopback
    target = loadgen.make_target(plain_server.base_url, "tiny", SPECS, batch=512)
    result = asyncio.run(loadgen.open_loop(target, 200.0, max_requests=40, max_seconds=0.5, timeout=0.001))
    codes = result.codes()
    assert len(result.samples) == sum(codes.values()) > 0
    assert set(codes) <= {"200", "timeout"} and codes.get("timeout", 0) > 0


@pytest.mark.e2e
def test_open_loop_spreads_requests_over_several_targets_at_random(plain_server):
    """Two 'replicas' told apart by their answers (200 vs 404): each request goes to one drawn at random."""
    good = loadgen.make_target(plain_server.base_url, "tiny", SPECS)
    wrong = loadgen.make_target(plain_server.base_url, "nope", SPECS)
    result = asyncio.run(loadgen.open_loop([good, wrong], 100.0, max_requests=60, max_seconds=10, seed=5))
    drawn = np.random.default_rng(6).integers(0, 2, 60)  # the draw open_loop makes for seed 5
    assert result.codes() == {"200": int((drawn == 0).sum()), "404": int((drawn == 1).sum())}
    assert len(result.send_lags) == 60 and min(result.send_lags) >= 0
