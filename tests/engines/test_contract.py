"""One contract suite, run against every engine available here, with one tiny artifact.

ONNX Runtime CPU and torch (eager, in memory, from the saved model.pt, and torch.compile: about 15 s of
compiling on 2 cores with a cold cache) always run; CUDA engines run only where CUDA exists and are skipped
otherwise; TensorRT is covered by tests/engines/test_gpu.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from _tiny_artifact import IN, OUT, Tiny, build_repo, expected

import engines
from engines.base import EngineError, InputError

CUDA = torch.cuda.is_available()
OPENVINO = importlib.util.find_spec("openvino") is not None


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def _factory(kind: str, model_dir):
    from engines.onnxruntime import OnnxRuntimeEngine
    from engines.torch import TorchEngine

    manifest = engines.manifest.read_manifest(model_dir)
    specs = dict(inputs=engines.specs(manifest.inputs), outputs=engines.specs(manifest.outputs))
    onnx, saved = model_dir / "unfused" / "model.onnx", model_dir / "unfused" / "model.pt"
    return {
        "ort-cpu": lambda: OnnxRuntimeEngine(onnx, intra_op_threads=1),
        "ort-cpu-no-opt": lambda: OnnxRuntimeEngine(onnx, optimization="disable"),
        "ort-cuda": lambda: OnnxRuntimeEngine(onnx, providers=["cuda"]),
        "torch-eager": lambda: TorchEngine(Tiny(), **specs),
        "torch-saved": lambda: TorchEngine(saved, **specs),
        "torch-compile": lambda: TorchEngine(Tiny(), mode="compile", **specs),
        "torch-cuda": lambda: TorchEngine(saved, device="cuda", **specs),
        "torch-cuda-compile": lambda: TorchEngine(Tiny(), device="cuda", mode="compile", **specs),
        "openvino-fp32": lambda: _openvino(onnx, threads=1),
        "openvino-fp32-cached": lambda: _openvino(onnx, cache_dir=model_dir.parent / "ov-cache"),
    }[kind]


def _openvino(path, **options):
    from engines.openvino import OpenVinoEngine

    return OpenVinoEngine(path, precision="fp32", **options)


KINDS = [
    "ort-cpu",
    "ort-cpu-no-opt",
    pytest.param("ort-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        "CUDAExecutionProvider" not in _ort_providers(), reason="onnxruntime has no CUDA execution provider")]),
    "torch-eager",
    "torch-saved",
    "torch-compile",
    pytest.param("torch-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]),
    pytest.param("torch-cuda-compile", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]),
    pytest.param("openvino-fp32", marks=pytest.mark.skipif(not OPENVINO, reason="openvino is not installed")),
    pytest.param("openvino-fp32-cached", marks=pytest.mark.skipif(not OPENVINO, reason="openvino is not installed")),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"), include_bound=False)


@pytest.fixture(params=KINDS)
def make(request, model_dir):
    return _factory(request.param, model_dir)


def x(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, IN)).astype(np.float32)


def test_specs_after_load(make):
    with make() as engine:
        assert [(s.name, s.datatype, s.shape) for s in engine.inputs] == [("x", "FP32", (-1, IN))]
        assert [(s.name, s.datatype, s.shape) for s in engine.outputs] == [("y", "FP32", (-1, OUT))]
        assert engine.describe()["runtime"] == engine.backend


@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_match_the_reference(make, batch):
    inputs = x(batch)
    with make() as engine:
        out = engine.infer({"x": inputs})
    assert set(out) == {"y"}
    assert out["y"].dtype == np.float32 and out["y"].shape == (batch, OUT)
    np.testing.assert_allclose(out["y"], expected(inputs), rtol=1e-5, atol=1e-5)


def test_inputs_are_not_modified(make):
    inputs = x(3)
    before = inputs.copy()
    with make() as engine:
        engine.infer({"x": inputs})
    np.testing.assert_array_equal(inputs, before)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((2, IN), np.float64)}, f"input 'x': got FP64 (2, {IN}), expected FP32 (-1, {IN}) (wrong datatype)"),
        ({"x": np.zeros((2, IN + 1), np.float32)}, f"got FP32 (2, {IN + 1}), expected FP32 (-1, {IN}) (dimension 1"),
        ({"x": np.zeros((IN,), np.float32)}, "wrong number of dimensions"),
        ({"x": np.zeros((0, IN), np.float32)}, "empty batch"),
        ({}, "missing input(s) ['x']; expected inputs: 'x' FP32 (-1, 6)"),
        ({"x": np.zeros((1, IN), np.float32), "z": np.zeros(1)}, "unknown input(s) ['z']"),
        ({"x": [[0.0] * IN]}, "expected a numpy array"),
    ],
    ids=["dtype", "dim", "rank", "empty", "missing", "unknown", "list"],
)
def test_bad_inputs_say_what_arrived_and_what_was_expected(make, inputs, message):
    with make() as engine:
        with pytest.raises(InputError) as info:
            engine.infer(inputs)
    assert message in str(info.value)


def test_lifecycle(make):
    engine = make()
    assert not engine.loaded
    with pytest.raises(EngineError, match="not loaded"):
        engine.infer({"x": x(1)})
    with engine as entered:
        assert entered is engine and engine.loaded
    assert not engine.loaded
    engine.close()  # twice is fine
    with pytest.raises(EngineError):
        engine.infer({"x": x(1)})
    assert engine.load().infer({"x": x(2)})["y"].shape == (2, OUT)  # reopens after close
    engine.close()


def test_max_batch_size_is_enforced(make):
    with make() as engine:
        engine.max_batch_size = 4
        with pytest.raises(InputError, match="batch of 5 exceeds this engine's maximum of 4"):
            engine.infer({"x": x(5)})


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", pytest.param("openvino", marks=pytest.mark.skipif(
    not OPENVINO, reason="openvino is not installed"))])
def test_engines_load_opens_the_default_variant(model_dir, backend):
    with engines.load(model_dir.parent, "tiny", backend=backend) as engine:
        assert engine.backend == backend
        np.testing.assert_allclose(engine.infer({"x": x(3)})["y"], expected(x(3)), rtol=1e-5, atol=1e-5)


def test_missing_execution_provider_is_an_error_not_a_silent_fallback(model_dir):
    from engines.onnxruntime import OnnxRuntimeEngine

    if "TensorrtExecutionProvider" in _ort_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(EngineError, match="TensorrtExecutionProvider is not available"):
        OnnxRuntimeEngine(model_dir / "unfused" / "model.onnx", providers=["tensorrt"]).load()


def test_ort_threads_do_not_spin_unless_asked(model_dir):
    from engines.onnxruntime import OnnxRuntimeEngine

    onnx = model_dir / "unfused" / "model.onnx"
    quiet = OnnxRuntimeEngine(onnx, intra_op_threads=1).load()
    spinning = OnnxRuntimeEngine(onnx, intra_op_threads=1, allow_spinning=True).load()
    try:
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            assert quiet.session_options.get_session_config_entry(key) == "0"
            assert spinning.session_options.get_session_config_entry(key) == "1"
        assert quiet.describe()["spinning"] == "off"
        np.testing.assert_allclose(quiet.infer({"x": x(2)})["y"], expected(x(2)), rtol=1e-5, atol=1e-5)
    finally:
        quiet.close()
        spinning.close()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", pytest.param("openvino", marks=pytest.mark.skipif(
    not OPENVINO, reason="openvino is not installed"))])
def test_every_cpu_backend_takes_intra_op_threads(model_dir, backend):
    """The server passes intra_op_threads to whichever backend it runs (torch used to refuse it: TypeError)."""
    with engines.load(model_dir.parent, "tiny", backend=backend, intra_op_threads=1) as engine:
        np.testing.assert_allclose(engine.infer({"x": x(3)})["y"], expected(x(3)), rtol=1e-5, atol=1e-5)
    if backend == "torch":
        assert torch.get_num_threads() == 1


def test_an_option_a_backend_does_not_take_is_an_engine_error_naming_it(model_dir):
    with pytest.raises(EngineError, match=r"backend 'torch' does not accept the options \['providers'\]"):
        engines.load(model_dir.parent, "tiny", backend="torch", providers=["cuda"])
