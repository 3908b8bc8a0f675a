"""TensorRT glue for the int8 variants, against the recording fake builder (and, marked `gpu`, the real one).

The int8 variant's QDQ ONNX (a real conversion) is parsed as it is — an explicitly quantized, strongly typed
network: no INT8 builder flag, no calibrator, precision "int8" in the plan key — whatever --precision says.
At build time the plan must meet the variant's own accuracy gate on the held-out inputs saved at conversion
(ONNX Runtime stands in for the GPU runtime: a plan runs as the ONNX it was built from), else it is removed.
"""

from __future__ import annotations

import importlib.util
import shutil
import types

import pytest

import convert.tensorrt.build as build
from convert.pipeline import ConvertOptions, convert
from convert.quantize import Int8Options
from engines.manifest import read_manifest
from engines.trt_cache import EngineKey, read_sidecar
from tests.convert.test_build_tensorrt import make_fake_trt, onnxruntime_runner, use_fake  # noqa: F401 - fixture
from tests.convert.test_quantize import source


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    options = ConvertOptions(variants=["unfused", "int8", "int8-plain"], samples=8, benchmark=False,
                             torch_artifacts=False, progress=False, int8=Int8Options(eval_samples=32))
    convert(source(), "tiny-vit", repo, options)
    return repo / "tiny-vit"


@pytest.fixture
def converted(pristine, tmp_path):
    model_dir = shutil.copytree(pristine, tmp_path / "tiny-vit")
    return model_dir, read_manifest(model_dir)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_int8_variant_builds_its_qdq_onnx_as_an_explicit_int8_plan(converted, use_fake, precision):  # noqa: F811
    model_dir, manifest = converted
    fake = use_fake(make_fake_trt())
    plans = build.build_engines(model_dir, manifest, precision=precision, batch_sizes=(1, 8, 32))
    keys = {read_sidecar(p)[0]: read_sidecar(p)[1] for p in plans}
    assert keys["int8"].precision == "int8" and keys["unfused"].precision == precision
    int8_graph = next(model for path, model in fake.parsed if path.endswith("int8/model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in int8_graph.graph.node) > 0  # the QDQ graph itself
    assert all(b.network.flags == 0 for b in fake.builds)  # strongly typed; Config.set_flag would have raised
    written = read_manifest(model_dir)
    assert written.variants["int8"].servable  # its plan met the accuracy gate (not the exact parity rule)
    assert not any(f.startswith("tensorrt-") for f in written.variants["int8"].flags)


def test_an_int8_plan_that_misses_its_gate_is_removed_and_the_variant_unservable(converted, use_fake):  # noqa: F811
    model_dir, manifest = converted
    plain = onnxruntime_runner()

    def broken(plan, inputs):  # the int8 plan's logits come out reversed (cosine -1; a scale alone keeps cosine)
        outputs = plain(plan, inputs)
        return [-o for o in outputs] if plan.parent.parent.name == "int8" else outputs

    use_fake(make_fake_trt(), broken)
    plans = build.build_engines(model_dir, manifest, batch_sizes=(1, 8, 32))
    assert "int8" not in {read_sidecar(p)[0] for p in plans} and "unfused" in {read_sidecar(p)[0] for p in plans}
    assert not list((model_dir / "int8" / "tensorrt").glob("*.plan"))
    assert not list((model_dir / "int8" / "tensorrt").glob("*.json"))
    info = read_manifest(model_dir).variants["int8"]
    assert not info.servable and any(f.startswith("tensorrt-accuracy-failed:int8") for f in info.flags)


def test_a_lossy_variant_that_failed_at_conversion_gets_no_plan(converted, use_fake):  # noqa: F811
    model_dir, manifest = converted
    use_fake(make_fake_trt())
    manifest.variants["int8"].servable = False
    manifest.variants["int8"].accuracy.passed = False
    plans = build.build_engines(model_dir, manifest)
    assert "int8" not in {read_sidecar(p)[0] for p in plans}


def test_the_serving_side_asks_for_the_gated_int8_plan_of_a_lossy_variant(converted, monkeypatch):
    import engines.tensorrt as runtime

    model_dir, manifest = converted
    asked = {}
    key = EngineKey("s" * 64, "o" * 64, "11.4.0.106", "GPU", "9.0", "int8", {}).to_json()
    record = types.SimpleNamespace(key=key, host_code_allowed=False)  # what the manifest records for the plan
    monkeypatch.setattr(runtime, "recorded_plan", lambda d, info, precision=None, device=0:
                        (asked.setdefault(info.name, precision), record))
    int8 = runtime.open_variant(model_dir, manifest, manifest.variants["int8"], {"reference": "r.npz"}, precision="fp16")
    unfused = runtime.open_variant(model_dir, manifest, manifest.variants["unfused"], {}, precision="fp16")
    assert asked == {"int8": "int8", "unfused": "fp16"}
    assert int8.gate == ("r.npz", manifest.variants["int8"].accuracy) and unfused.gate is None


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs a CUDA GPU and the full TensorRT")
def test_real_tensorrt_builds_and_gates_the_int8_plan(converted):
    """On a GPU host: the real builder parses the QDQ ONNX into an INT8 plan that passes its gate, and the
    serving runtime opens it (judging it again)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from engines.manifest import verify_files
    from engines.tensorrt import TensorRTEngine

    model_dir, manifest = converted
    plans = build.build_engines(model_dir, manifest, batch_sizes=(1, 8, 32))
    int8 = next(p for p in plans if read_sidecar(p)[0] == "int8")
    assert read_sidecar(int8)[1].precision == "int8" and read_manifest(model_dir).variants["int8"].servable
    info = manifest.variants["int8"]
    TensorRTEngine(int8, gate=(verify_files(model_dir, info)["reference"], info.accuracy)).load().close()
