"""What the OpenVINO engine adds to the contract (tests/engines/test_contract.py runs the contract on it): an
explicit precision, the compiled-model cache key (over every file the model is built from), and concurrent infer
calls on its request pool."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from _tiny_artifact import IN, OUT, Tiny, build_repo, expected

pytest.importorskip("openvino")

from engines.openvino import OpenVinoEngine, cache_key  # noqa: E402


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"), include_bound=False) / "unfused" / "model.onnx"


@pytest.fixture(scope="module")
def ir_pair(onnx, tmp_path_factory):
    """DIR/a and DIR/b: the tiny model as OpenVINO IR, the same model.xml byte for byte, and model.bin files that
    differ only in the head's weight matrix (negated in b)."""
    import openvino as ov

    root = tmp_path_factory.mktemp("ir")
    ov.save_model(ov.convert_model(onnx), root / "a" / "model.xml", compress_to_fp16=False)
    (root / "b").mkdir()
    shutil.copy(root / "a" / "model.xml", root / "b" / "model.xml")
    weights = bytearray((root / "a" / "model.bin").read_bytes())
    (head,) = [data.attrib for data in ElementTree.parse(root / "a" / "model.xml").iter("data")
               if data.get("element_type") == "f32" and int(data.get("size", 0)) == IN * OUT * 4]
    start, size = int(head["offset"]), int(head["size"])
    weights[start:start + size] = (-np.frombuffer(weights[start:start + size], np.float32)).tobytes()
    (root / "b" / "model.bin").write_bytes(weights)
    return root


def expected_negated(x: np.ndarray) -> np.ndarray:
    """The tiny model with its head's weight matrix negated: y = b - W·norm(x)."""
    model = Tiny().double().eval()
    with torch.no_grad():
        model.head.weight.neg_()
        return model(torch.from_numpy(x.astype(np.float64))).numpy()


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


def test_cache_is_keyed_by_files_version_cpu_and_properties(onnx, tmp_path):
    from engines.manifest import sha256_file

    key = cache_key([sha256_file(onnx)], "2026.4.1-123-abc", "AMD EPYC [avx2]")
    assert key.split("-")[1] == "2026.4.1"
    assert key != cache_key([sha256_file(onnx)], "2026.4.1", "Intel Xeon [avx2 amx_bf16]")
    assert key != cache_key([sha256_file(onnx)], "2026.5.0", "AMD EPYC [avx2]")
    assert key != cache_key([sha256_file(onnx)], "2026.4.1", "AMD EPYC [avx2]", {"INFERENCE_PRECISION_HINT": "bf16"})
    OpenVinoEngine(onnx, cache_dir=tmp_path).load().close()
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith(cache_key([sha256_file(onnx)], "x", "y").split("-")[0]) and any(entry.iterdir())
    with OpenVinoEngine(onnx, cache_dir=tmp_path) as again:  # imports the cached blob
        np.testing.assert_allclose(again.infer({"x": x(2)})["y"], expected(x(2)), rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.iterdir())) == 1


def test_cache_key_covers_every_file_not_only_the_first():
    """An IR's .xml with two different .bin files (or an ONNX with two external data files) is two models."""
    xml, bin_a, bin_b = "a" * 64, "b" * 64, "c" * 64
    assert cache_key([xml, bin_a], "2026.4.1", "cpu") != cache_key([xml, bin_b], "2026.4.1", "cpu")
    assert cache_key([xml, bin_a], "2026.4.1", "cpu") != cache_key([xml], "2026.4.1", "cpu")
    with pytest.raises(ValueError, match="at least the model file"):
        cache_key([], "2026.4.1", "cpu")


def test_ir_with_changed_weights_is_compiled_afresh_through_the_manifest(ir_pair, tmp_path):
    """Two plans' IRs with the same .xml and different .bin, opened as engines.load does (verified bytes, the
    manifest's sha256s): each gets its own cache entry and answers with its own weights."""
    from engines.manifest import artifact, file_ref
    from engines.openvino import open_variant

    model_dir, cache = ir_pair, tmp_path / "cache"
    info = SimpleNamespace(name="tiny")
    for plan, want in (("a", expected), ("b", expected_negated), ("a", expected), ("b", expected_negated)):
        files = {role: artifact(model_dir, plan, role, file_ref(model_dir, model_dir / plan / name))
                 for role, name in (("openvino", "model.xml"), ("openvino_weights", "model.bin"))}
        with open_variant(model_dir, None, info, files, cache_dir=cache).load() as engine:
            np.testing.assert_allclose(engine.infer({"x": x(4)})["y"], want(x(4)), rtol=1e-4, atol=1e-4)
    assert len(list(cache.iterdir())) == 2  # one compiled blob per set of weights, each reused once


def test_ir_by_path_is_recompiled_after_its_weights_change(ir_pair, tmp_path):
    model, cache = tmp_path / "model.xml", tmp_path / "cache"
    shutil.copy(ir_pair / "a" / "model.xml", model)
    shutil.copy(ir_pair / "a" / "model.bin", model.with_suffix(".bin"))
    with OpenVinoEngine(model, cache_dir=cache) as engine:
        np.testing.assert_allclose(engine.infer({"x": x(4)})["y"], expected(x(4)), rtol=1e-4, atol=1e-4)
    shutil.copy(ir_pair / "b" / "model.bin", model.with_suffix(".bin"))  # the same .xml, new weights
    with OpenVinoEngine(model, cache_dir=cache) as engine:
        np.testing.assert_allclose(engine.infer({"x": x(4)})["y"], expected_negated(x(4)), rtol=1e-4, atol=1e-4)
    assert len(list(cache.iterdir())) == 2


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


def test_source_files_name_an_onnx_files_external_data(onnx, tmp_path):
    """An ONNX file by path keys its cache with the external data its initializers reference."""
    import onnx as onnx_lib

    from engines.openvino import source_files

    model = tmp_path / "model.onnx"
    onnx_lib.save_model(onnx_lib.load(str(onnx)), str(model), save_as_external_data=True,
                        location="model.onnx.data", size_threshold=0)
    assert source_files(model) == [model, tmp_path / "model.onnx.data"]
    assert source_files(onnx) == [onnx]


def test_an_onnx_with_external_data_is_refused_through_the_manifest(onnx, tmp_path):
    """OpenVINO resolves an ONNX model's external data against the working directory when it reads the model from
    bytes: through the manifest such a variant is refused with the reason, never compiled from a stray file."""
    import onnx as onnx_lib

    from engines.base import EngineError
    from engines.manifest import artifact, file_ref
    from engines.openvino import open_variant

    (tmp_path / "big").mkdir()
    onnx_lib.save_model(onnx_lib.load(str(onnx)), str(tmp_path / "big" / "model.onnx"), save_as_external_data=True,
                        location="model.onnx.data", size_threshold=0)
    files = {role: artifact(tmp_path, "big", role, file_ref(tmp_path, tmp_path / "big" / name))
             for role, name in (("onnx", "model.onnx"), ("onnx_data", "model.onnx.data"))}
    with pytest.raises(EngineError, match=r"'big' keeps its ONNX weights in an external data file \(big/model"):
        open_variant(tmp_path, None, SimpleNamespace(name="big"), files)
