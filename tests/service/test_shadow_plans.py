"""What the shadow metrics say about a plan: its precision and exactness in `normfuse_engine_info` (from the
manifest's plan record, not from the engine's I/O dtypes), and latency-ratio buckets that tell a plan 4× faster
from one 33× slower (bf16 emulated) instead of piling both into the end buckets."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from engines.cpu import detect
from engines.plans import Plan, PlanGate, PlanSet
from service.metrics import RATIO_BUCKETS, Metrics, engine_info
from tests.service import repo_builder

ORT_FP32 = {"runtime": "onnxruntime", "version": "1.32.0", "precision": "fp32"}  # what an ORT engine describes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from engines.manifest import read_manifest

    repo = repo_builder.build_test_repo(tmp_path_factory.mktemp("repo"), broken=False)
    repo_builder.add_int8_variant(repo / repo_builder.MODEL)
    return read_manifest(repo / repo_builder.MODEL)


def with_plans(manifest):
    gate = PlanGate(passed=True, samples=64, rel_l2=4e-3, cosine=0.99999, top1_agreement=1.0,
                    gate={"min_top1_agreement": 0.995, "min_cosine": 0.9999})
    plans = {
        "unfused": Plan(name="unfused", variant="unfused", engine="onnxruntime", precision="fp32", exact=True,
                        servable=True),
        "affine-ov-bf16": Plan(name="affine-ov-bf16", variant="affine", engine="openvino", precision="bf16",
                               exact=False, servable=True, gate=gate),
    }
    return manifest.model_copy(update={"plans": PlanSet(cpu=detect(), plans=plans, default="unfused")})


def test_an_exact_variant_keeps_its_engines_precision(manifest):
    info = engine_info(ORT_FP32, manifest, "affine", "rev1", default=True)
    assert info["precision"] == "fp32" and info["exact"] == "true" and info["revision"] == "rev1"
    assert info["default"] == "true"
    assert info["onnx_sha256"] == manifest.variants["affine"].files["onnx"].sha256


def test_an_int8_variant_on_onnx_runtime_says_int8_not_its_fp32_io(manifest):
    assert manifest.variants["int8"].servable, "the test's int8 variant failed its gate"
    info = engine_info(ORT_FP32, manifest, "int8", "rev1", default=False)
    assert (info["precision"], info["exact"], info["runtime"]) == ("int8", "false", "onnxruntime")


def test_a_plan_says_the_precision_its_record_names(manifest):
    from service.plans import as_variant

    planned = with_plans(manifest)
    planned.variants["affine-ov-bf16"] = as_variant(planned, planned.plans.plans["affine-ov-bf16"])
    described = {"runtime": "openvino", "precision": "bf16", "hint": "LATENCY"}
    info = engine_info(described, planned, "affine-ov-bf16", "rev2", default=True)
    assert (info["runtime"], info["precision"], info["exact"]) == ("openvino", "bf16", "false")
    assert engine_info(ORT_FP32, planned, "unfused", "rev2", default=False)["precision"] == "fp32"
    # another engine serving a variant (TensorRT fp16) keeps its own description: the record is ONNX Runtime's
    tensorrt = {"runtime": "tensorrt", "precision": "fp16"}
    assert engine_info(tensorrt, planned, "unfused", "rev2", default=False)["precision"] == "fp16"


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.97, 1.02, 2.5, 33.0])
def test_plan_ratios_land_in_their_own_finite_bucket(ratio):
    """A 4× faster plan (0.25), a 1–3 % norm rewrite (0.97, 1.02) and an emulated bf16 plan (33) each fall in a
    bucket whose bounds are within 2× of the ratio, so histogram_quantile reports them, not a clamp."""
    upper = next(b for b in RATIO_BUCKETS if b >= ratio)
    lower = max([b for b in RATIO_BUCKETS if b < ratio], default=0.0)
    assert upper <= 2 * ratio and lower >= ratio / 2
    if 0.5 <= ratio <= 2.0:
        assert upper / max(lower, 1e-9) <= 1.06  # the norm rewrites' range keeps its 5 % resolution


def test_a_plans_shadow_series_are_exported_with_its_labels():
    metrics = Metrics()
    labels = {"model": "m", "variant": "affine-ov-bf16", "backend": "openvino"}
    metrics.shadow_ratio.labels(**labels).observe(0.25)
    metrics.shadow_agreement.labels(**labels).observe(1.0)
    metrics.engine.labels(**labels).info({"runtime": "openvino", "precision": "bf16", "exact": "false"})
    text = generate_latest(metrics.registry).decode()
    assert 'normfuse_shadow_latency_ratio_bucket{backend="openvino",le="0.25",model="m",variant="affine-ov-bf16"} 1.0' in text
    assert 'normfuse_shadow_latency_ratio_bucket{backend="openvino",le="0.125",model="m",variant="affine-ov-bf16"} 0.0' in text
    assert 'normfuse_shadow_agreement_count{backend="openvino",model="m",variant="affine-ov-bf16"} 1.0' in text
    assert len(RATIO_BUCKETS) == 40  # bounded: 41 series with +Inf per shadowed version
