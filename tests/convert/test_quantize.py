"""int8 / int8-plain: the quantized ONNX holds quantized linear layers (norms and softmax in float), the gate
passes good calibration and fails broken calibration, refusals keep the other variants, lossy is never default."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from convert.export import export_onnx, ort_session, run_onnx
from convert.models import Source
from convert.pipeline import ConvertOptions, convert
from convert.quantize import Int8Options, QuantizationError, batches, passes_gate, quantize_onnx
from convert.rewrites.smooth import inject_outliers
from engines.manifest import Manifest, TensorInfo, accuracy_figures
from tests.convert._models_a import TinyViT

PATCHES, PATCH_DIM, CLASSES = 4, 16, 5


def stress_model():
    """A TinyViT with trained-like logit margins, then outlier channels in every Pre-LN norm's output
    (a function-preserving γ-scaling: smoothing can undo it, plain per-tensor int8 suffers)."""
    model = TinyViT(width=32, depth=2, patch_dim=PATCH_DIM, patches=PATCHES, classes=CLASSES)
    with torch.no_grad():
        model.head.weight *= 10  # random logits are near ties; trained ones are not
    return inject_outliers(model, channels=(5, 17), factor=50.0).eval()


def source(model=None, calibration_scale: float = 1.0) -> Source:
    def sample(n):
        return {"x": np.random.default_rng(3).standard_normal((n, PATCHES, PATCH_DIM)).astype(np.float32)}

    def calibrate(n):  # a different draw; scale < 1 breaks the calibration on purpose
        return {"x": calibration_scale * np.random.default_rng(4).standard_normal((n, PATCHES, PATCH_DIM)).astype(np.float32)}

    return Source(name="tiny-vit", description="", model=(model or stress_model()).eval(),
                  inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, PATCHES, PATCH_DIM])],
                  outputs=[TensorInfo(name="logits", datatype="FP32", shape=[-1, CLASSES])],
                  task="image-classification", sample_inputs=sample, calibration_inputs=calibrate)


def exported(tmp_path: Path, smoothed: bool = False) -> tuple[Path, Source]:
    src = source()
    model = src.model
    if smoothed:
        from convert.rewrites.smooth import smooth

        calibration = {"x": torch.from_numpy(src.calibration_inputs(32)["x"])}
        model = smooth(copy.deepcopy(model), calibration=[calibration])
    path = export_onnx(model, src.sample_inputs(2), tmp_path / "fp32.onnx", inputs=src.inputs, outputs=src.outputs)
    return path, src


def test_quantized_onnx_holds_quantized_linear_layers_and_keeps_norms_and_softmax_in_float(tmp_path):
    fp32, src = exported(tmp_path)
    record = quantize_onnx(fp32, tmp_path / "int8.onnx", batches(src.calibration_inputs(32), 8))
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dequantized = [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert all(consumers.get(t, set()) & {"MatMul", "Gemm"} for t in dequantized)  # each one feeds a linear layer
    assert not {o.name for o in graph.output} & set(dequantized)  # outputs stay float
    float_inputs = [i for n in graph.node if n.op_type in ("LayerNormalization", "Softmax") for i in n.input]
    assert not set(float_inputs) & set(dequantized)  # norms and softmax read float tensors
    assert "LayerNormalization" in record["float_ops_kept"] and "Softmax" in record["float_ops_kept"]
    assert record["linear_layers"] >= 9 and record["qdq_nodes"]["DequantizeLinear"] > 0
    weight_scales = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert weight_scales, "weights are quantized per channel (a vector of scales)"


def test_gate_passes_good_calibration_and_fails_broken_calibration(tmp_path):
    fp32, src = exported(tmp_path, smoothed=True)
    held_out = src.sample_inputs(64)
    reference = run_onnx(ort_session(fp32), held_out)
    options = Int8Options()
    verdicts = {}
    for scale in (1.0, 1e-3):  # 1e-3: the activation ranges are ~1000x too small, everything clips
        out = tmp_path / f"int8-{scale}.onnx"
        quantize_onnx(fp32, out, batches({"x": scale * src.calibration_inputs(32)["x"]}, 8))
        figures = accuracy_figures(reference, run_onnx(ort_session(out), held_out))
        verdicts[scale] = passes_gate(figures, options)
    assert verdicts[1.0] == (True, [])
    passed, failed = verdicts[1e-3]
    assert not passed and any("cosine" in f for f in failed)


def test_a_model_without_linear_layers_is_refused(tmp_path):
    class Scale(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (PATCH_DIM,)) * 2

    src = source(Scale())
    path = export_onnx(src.model, src.sample_inputs(2), tmp_path / "m.onnx", inputs=src.inputs, outputs=src.outputs)
    with pytest.raises(QuantizationError, match="no linear layer"):
        quantize_onnx(path, tmp_path / "q.onnx", batches(src.calibration_inputs(8), 8))


@pytest.mark.parametrize("flag", ["alpha", "min_agreement", "min_cosine"])
def test_options_outside_the_unit_interval_name_their_flag(flag):
    with pytest.raises(ValueError, match=f"--int8-{flag.replace('_', '-')}"):
        Int8Options(**{flag: 1.5})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    options = ConvertOptions(variants=["unfused", "affine", "int8", "int8-plain"], samples=8, benchmark=False,
                             torch_artifacts=False, progress=False, int8=Int8Options(eval_samples=64))
    return convert(source(), "tiny-vit", repo, options)


def test_pipeline_records_both_lossy_variants_against_unfused(converted):
    int8, plain = converted.variants["int8"], converted.variants["int8-plain"]
    assert not int8.exact and not plain.exact and plain.benchmark_only and not plain.servable
    for info in (int8, plain):
        acc = info.accuracy
        assert acc.samples == 64 and acc.reference.startswith("onnxruntime") and 0 < acc.rel_l2 < 1
        assert acc.gate == {"min_top1_agreement": 0.99, "min_cosine": 0.999}
        assert acc.calibration["source"] == "calibration_inputs"
    assert int8.servable == int8.accuracy.passed
    smoothing = int8.accuracy.smoothing
    assert "blocks.0.norm1" in smoothing["applied"] and plain.accuracy.smoothing is None
    assert int8.parity[0].passed and "smoothed" in int8.parity[0].candidate  # the reparameterization is exact
    assert converted.default_variant == "unfused" and not converted.allow_lossy_default


def test_smoothing_beats_plain_quantization_on_the_outlier_channel(converted):
    assert converted.variants["int8"].accuracy.rel_l2 < converted.variants["int8-plain"].accuracy.rel_l2


def test_a_lossy_default_needs_the_flag(converted):
    data = converted.model_dump()
    data["variants"]["int8"]["servable"] = True
    data["variants"]["int8"]["accuracy"]["passed"] = True
    data["default_variant"] = "int8"
    with pytest.raises(ValueError, match="allow-lossy-default"):
        Manifest.model_validate(data)
    assert Manifest.model_validate(data | {"allow_lossy_default": True}).default_variant == "int8"
    data["variants"]["int8"]["accuracy"]["passed"] = False
    with pytest.raises(ValueError, match="accuracy gate"):
        Manifest.model_validate(data | {"allow_lossy_default": True})


def test_broken_calibration_fails_the_gate_and_is_not_served(tmp_path):
    options = ConvertOptions(variants=["unfused", "int8"], samples=8, benchmark=False, torch_artifacts=False,
                             progress=False, int8=Int8Options(eval_samples=32))
    manifest = convert(source(calibration_scale=1e-3), "broken", tmp_path, options)
    int8 = manifest.variants["int8"]
    assert not int8.servable and not int8.accuracy.passed and int8.accuracy.failed
    assert any(f.startswith("accuracy-gate-failed") for f in int8.flags)
    assert manifest.servable() == ["unfused"]


def test_int8_on_a_model_without_linear_layers_is_refused_and_the_rest_is_built(tmp_path):
    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(PATCH_DIM)

        def forward(self, x):
            return self.norm(x)[:, 0, :CLASSES]

    options = ConvertOptions(variants=["unfused", "int8"], samples=8, benchmark=False, torch_artifacts=False,
                             progress=False)
    manifest = convert(source(NoLinear()), "nolinear", tmp_path, options)
    assert "no linear layer" in manifest.not_applicable["int8"]
    assert manifest.servable() == ["unfused"]


@pytest.mark.parametrize("allow", [False, True])
def test_a_faster_lossy_variant_is_default_only_with_the_flag(tmp_path, monkeypatch, allow):
    """The conversion-time benchmark sees int8 twice as fast (timings faked: tests never depend on timing)."""
    from convert import default_pick

    monkeypatch.setattr(default_pick, "timed", lambda session, inputs: 0.005 if "int8" in session._model_path else 0.01)
    options = ConvertOptions(variants=["unfused", "int8"], samples=8, benchmark=True, benchmark_rounds=7,
                             torch_artifacts=False, progress=False, allow_lossy_default=allow,
                             int8=Int8Options(eval_samples=32))
    manifest = convert(source(), "fast", tmp_path, options)
    assert manifest.variants["int8"].servable
    assert manifest.default_variant == ("int8" if allow else "unfused")
    assert manifest.allow_lossy_default is allow


def test_a_calibration_that_fails_is_refused_with_the_reason_and_the_rest_is_built(tmp_path):
    src = source()
    src.calibration_inputs = lambda n: {"x": np.zeros((n, PATCHES + 1, PATCH_DIM - 3), np.float32)}  # wrong shape
    options = ConvertOptions(variants=["unfused", "affine", "int8", "int8-plain"], samples=8, benchmark=False,
                             torch_artifacts=False, progress=False, int8=Int8Options(eval_samples=16))
    manifest = convert(src, "badcal", tmp_path, options)
    assert "calibration/quantization failed" in manifest.not_applicable["int8-plain"]
    assert manifest.not_applicable["int8"].strip()  # smoothing's calibration pass already fails, with its error
    assert manifest.servable() == ["unfused", "affine"]
