"""GPU-only checks, marked `gpu` (run them with `pytest -m gpu`); each skips cleanly where its needs are absent.

* TorchEngine on CUDA (eager, torch.compile, CUDA graphs): fused (`rmsnorm`) vs unfused parity, so the two
  can be timed on any NVIDIA GPU even without TensorRT.
* TensorRT: build a plan per variant from the real exported ONNX, run it through TensorRTEngine, compare
  with ONNX Runtime on CPU; FP32 and the FP16 precision-annotated ONNX.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible to torch")
needs_tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and importlib.util.find_spec("tensorrt") is not None),
    reason="needs a CUDA GPU and the full TensorRT (`import tensorrt` with its builder)",
)


def specs():
    from engines.base import TensorSpec

    return [TensorSpec("x", "FP32", (-1, 4, 16))], [TensorSpec("y", "FP32", (-1, 5))]


def tiny_models():
    from convert.rewrites import rewrite
    from tests.convert._models_a import TinyViT

    torch.manual_seed(0)
    unfused = TinyViT().eval()
    return {"unfused": unfused, "rmsnorm": rewrite(unfused, "rmsnorm")}


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def batch(n: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((n, 4, 16)).astype(np.float32)}


@needs_cuda
@pytest.mark.parametrize(
    "mode, cuda_graphs, precision, budget",
    [("eager", False, "fp32", 1e-4), ("compile", False, "fp32", 1e-4), ("compile", True, "fp32", 1e-4),
     ("eager", False, "fp16", 2e-2)],
)
def test_torch_engine_on_cuda_fused_matches_unfused(mode, cuda_graphs, precision, budget):
    from engines.torch import TorchEngine

    inputs, outputs = specs()
    models = tiny_models()
    with TorchEngine(models["unfused"], inputs=inputs, outputs=outputs) as cpu:
        reference = cpu.infer(batch())["y"].astype(np.float64)
    results = {}
    for name, model in models.items():
        engine = TorchEngine(model, inputs=inputs, outputs=outputs, device="cuda", mode=mode,
                             cuda_graphs=cuda_graphs, precision=precision)
        with engine:
            for n in (1, 8, 3):  # several batch sizes: dynamic shapes and CUDA-graph re-recording
                out = engine.infer(batch(n))["y"]
                assert out.shape == (n, 5) and np.isfinite(out).all()
            results[name] = engine.infer(batch())["y"]
            assert engine.describe()["device"] == "cuda"
    for name, got in results.items():
        assert rel_l2(got, reference) <= budget, (name, rel_l2(got, reference))
    assert rel_l2(results["rmsnorm"], results["unfused"].astype(np.float64)) <= 2 * budget


@pytest.fixture
def repo(tmp_path):
    from convert.export import export_onnx
    from engines.manifest import Manifest, TensorInfo, VariantInfo, file_ref, write_manifest

    inputs = [TensorInfo(name="x", datatype="FP32", shape=[-1, 4, 16])]
    outputs = [TensorInfo(name="y", datatype="FP32", shape=[-1, 5])]
    model_dir = tmp_path / "tiny"
    variants = {}
    for name, model in tiny_models().items():
        path = export_onnx(model, batch(2), model_dir / name / "model.onnx", inputs=inputs, outputs=outputs)
        variants[name] = VariantInfo(name=name, servable=True, files={"onnx": file_ref(model_dir, path)})
    manifest = Manifest(name="tiny", source="test", inputs=inputs, outputs=outputs, variants=variants,
                        default_variant="unfused")
    write_manifest(model_dir, manifest)
    return model_dir, manifest


@needs_tensorrt
@pytest.mark.parametrize("precision, budget", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_build_run_and_parity_with_onnxruntime(repo, precision, budget):
    import onnxruntime as ort

    from convert.tensorrt.build import BuildOptions, build_engines
    from engines.base import InputError
    from engines.tensorrt import TensorRTEngine, find_plan

    model_dir, manifest = repo
    options = BuildOptions(precision=precision, batch_sizes=(1, 4, 8), tf32=False, optimization_level=2)
    plans = build_engines(model_dir, manifest, options=options)
    assert build_engines(model_dir, manifest, options=options) == plans  # the second call hits the cache
    x = batch(8)
    for (name, variant), plan in zip(manifest.variants.items(), plans, strict=True):
        assert find_plan(model_dir, variant, precision=precision) == plan
        session = ort.InferenceSession(str(model_dir / variant.files["onnx"].path), providers=["CPUExecutionProvider"])
        reference = session.run(None, x)[0].astype(np.float64)
        with TensorRTEngine(plan) as engine:
            assert engine.max_batch_size == 8
            assert engine.describe()["precision"] == precision
            got = engine.infer(x)["y"]
            assert got.dtype == np.float32  # FP32 I/O also for the FP16 engine (keep_io_types)
            assert rel_l2(got, reference) <= budget, (name, precision, rel_l2(got, reference))
            np.testing.assert_allclose(engine.infer({"x": x["x"][:3]})["y"], got[:3], rtol=budget, atol=budget)
            with pytest.raises(InputError, match="maximum of 8"):
                engine.infer(batch(9))
