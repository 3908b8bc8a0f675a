"""What the OpenVINO engine adds to the contract (tests/engines/test_contract.py runs the contract on it): an
explicit precision, the compiled-model cache key, and concurrent infer calls on its request pool."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _tiny_artifact import IN, build_repo, expected

pytest.importorskip("openvino")

from engines.openvino import OpenVinoEngine, cache_key  # noqa: E402


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"), include_bound=False) / "unfused" / "model.onnx"


def x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def test_precision_is_always_explicit(onnx):
    """OpenVINO's own default on a bf16-capable CPU is bf16: an fp32 engine must say f32, not inherit it."""
    with OpenVinoEngine(onnx, precision="fp32") as fp32, OpenVinoEngine(onnx, precision="bf16") as bf16:
        assert fp32.config()["INFERENCE_PRECISION_HINT"] == "f32"
        assert fp32.describe()["precision"] == "fp32" and bf16.describe()["precision"] == "bf16"
        exact = np.abs(fp32.infer({"x": x(8)})["y"] - expected(x(8))).max()
        reduced = np.abs(bf16.infer({"x": x(8)})["y"] - expected(x(8))).max()
    assert exact < 1e-5
    assert reduced < 5e-2  # bf16 keeps 8 mantissa bits: close, not exact


def test_concurrent_calls_share_the_request_pool(onnx):
    with OpenVinoEngine(onnx, precision="fp32", streams=2, hint="THROUGHPUT") as engine:
        batches = [x(3, seed) for seed in range(16)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda b: engine.infer({"x": b})["y"], batches))
        assert engine.describe()["streams"] == "2"
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_allclose(result, expected(batch), rtol=1e-5, atol=1e-5)


def test_parallelism_is_the_number_of_infer_requests(onnx):
    """What the batcher reads to keep that many batches in flight: one per stream, 1 under LATENCY."""
    with OpenVinoEngine(onnx, precision="fp32", streams=2, hint="THROUGHPUT") as two, \
            OpenVinoEngine(onnx, precision="fp32", streams=1, hint="LATENCY") as one:
        assert two.parallelism == 2 and two._requests.qsize() == 2
        assert one.parallelism == 1
    assert two.parallelism == 1  # closed: no requests left


def test_cache_is_keyed_by_file_version_and_cpu(onnx, tmp_path):
    key = cache_key(onnx, "2026.4.1-123-abc", "AMD EPYC [avx2]")
    assert key.split("-")[1] == "2026.4.1"
    assert key != cache_key(onnx, "2026.4.1", "Intel Xeon [avx2 amx_bf16]")
    assert key != cache_key(onnx, "2026.5.0", "AMD EPYC [avx2]")
    OpenVinoEngine(onnx, cache_dir=tmp_path).load().close()
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith(cache_key(onnx, "x", "y").split("-")[0]) and any(entry.iterdir())
    with OpenVinoEngine(onnx, cache_dir=tmp_path) as again:  # imports the cached blob
        np.testing.assert_allclose(again.infer({"x": x(2)})["y"], expected(x(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"hint": "FAST"}, "performance hint must be one of LATENCY, THROUGHPUT"),
    ({"streams": 0}, "streams must be a positive integer"),
])
def test_bad_options_are_refused_with_what_is_expected(onnx, options, message):
    with pytest.raises(ValueError, match=message):
        OpenVinoEngine(onnx, **options)


def test_missing_file_is_an_engine_error(tmp_path):
    from engines.base import EngineError

    with pytest.raises(EngineError, match="does not exist"):
        OpenVinoEngine(tmp_path / "nothing.onnx").load()
