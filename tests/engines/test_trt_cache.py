"""Engine-cache keying: pure Python, no TensorRT needed."""

from __future__ import annotations

import dataclasses
import os

import pytest

from engines.manifest import FileRef
from engines.trt_cache import (
    EngineCacheError,
    EngineKey,
    ShapeProfile,
    lookup,
    plan_path,
    read_sidecar,
    require,
    select_plan,
    timing_cache_path,
    variant_source_sha256,
    write_sidecar,
)


def make_key(**changes) -> EngineKey:
    key = EngineKey(
        source_sha256="a" * 64,
        onnx_sha256="b" * 64,
        trt_version="11.4.0.106",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        profiles={"pixels": ShapeProfile((1, 64), (8, 64), (32, 64))},
        builder_flags={"builder_optimization_level": "3", "workspace_bytes": str(1 << 30)},
    )
    return dataclasses.replace(key, **changes)


def store(tmp_path, variant: str, key: EngineKey):
    plan = plan_path(tmp_path, variant, key)
    plan.write_bytes(b"plan")
    write_sidecar(plan, variant, key, build_log=["[W] something"])
    return plan


def test_file_name_is_stable_readable_and_ends_in_the_key_hash():
    key = make_key()
    stem = key.stem("rmsnorm")
    assert stem == make_key().stem("rmsnorm")
    assert stem.startswith("rmsnorm.fp16.trt11.4.0.106.sm90.")
    assert stem.endswith(key.digest()[:12])
    assert "/" not in make_key(gpu_name="NVIDIA A100/PCIe 40GB").stem("v")


@pytest.mark.parametrize(
    "change",
    [
        {"source_sha256": "c" * 64},
        {"onnx_sha256": "c" * 64},
        {"trt_version": "11.3.0.99"},
        {"gpu_name": "NVIDIA A100-SXM4-80GB"},
        {"compute_capability": "8.0"},
        {"precision": "fp32"},
        {"profiles": {"pixels": ShapeProfile((1, 64), (16, 64), (32, 64))}},
        {"builder_flags": {"builder_optimization_level": "5", "workspace_bytes": str(1 << 30)}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_key_field_changes_the_file_name(change):
    assert make_key(**change).stem("v") != make_key().stem("v")


def test_builder_flag_order_does_not_matter():
    a = make_key(builder_flags={"x": "1", "y": "2"})
    b = make_key(builder_flags={"y": "2", "x": "1"})
    assert a.digest() == b.digest()


def test_sidecar_round_trips(tmp_path):
    key = make_key()
    plan = store(tmp_path, "rmsnorm", key)
    assert read_sidecar(plan) == ("rmsnorm", key)


def test_lookup_hit_and_mismatch_names_the_difference(tmp_path):
    store(tmp_path, "rmsnorm", make_key())
    assert lookup(tmp_path, "rmsnorm", make_key())
    miss = lookup(tmp_path, "rmsnorm", make_key(trt_version="11.5.0.1"))
    assert not miss
    assert "trt_version: 11.4.0.106 (cached) != 11.5.0.1 (wanted)" in miss.reason
    assert not lookup(tmp_path, "affine", make_key())


def test_lookup_refuses_a_tampered_sidecar(tmp_path):
    plan = store(tmp_path, "rmsnorm", make_key())
    write_sidecar(plan, "rmsnorm", make_key(precision="fp32"))  # the file name says fp16
    found = lookup(tmp_path, "rmsnorm", make_key())
    assert not found and "precision" in found.reason


def test_require_rebuilds_where_possible_and_explains_where_not(tmp_path):
    store(tmp_path, "rmsnorm", make_key())
    wanted = make_key(compute_capability="8.9", gpu_name="NVIDIA L4")
    assert not require(tmp_path, "rmsnorm", wanted, can_build=True).hit
    with pytest.raises(EngineCacheError, match=r"compute_capability: 9\.0 \(cached\) != 8\.9.*no CUDA GPU"):
        require(tmp_path, "rmsnorm", wanted, can_build=False, why_not="no CUDA GPU")


def test_select_plan_matches_on_source_precision_and_gpu(tmp_path):
    fp16 = store(tmp_path, "rmsnorm", make_key())
    store(tmp_path, "rmsnorm", make_key(precision="fp32", onnx_sha256="a" * 64))
    found = select_plan(
        tmp_path, "rmsnorm", source_sha256="a" * 64, precision="fp16", trt_version="11.4.0.106",
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
    )
    assert found == fp16
    fp32 = plan_path(tmp_path, "rmsnorm", make_key(precision="fp32", onnx_sha256="a" * 64))
    os.utime(fp16, ns=(1, 1))  # the fp32 plan is the newer one
    newest = select_plan(
        tmp_path, "rmsnorm", source_sha256="a" * 64, precision=None, trt_version="11.4.0.106",
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
    )
    assert newest == fp32
    with pytest.raises(EngineCacheError, match=r"gpu_name 'NVIDIA H100 80GB HBM3' != 'NVIDIA L4'"):
        select_plan(
            tmp_path, "rmsnorm", source_sha256="a" * 64, precision="fp16", trt_version="11.4.0.106",
            gpu_name="NVIDIA L4", compute_capability="8.9",
        )


def test_variant_source_digest_covers_external_data():
    onnx = FileRef(path="v/model.onnx", sha256="1" * 64, bytes=1)
    data = FileRef(path="v/model.onnx.data", sha256="2" * 64, bytes=1)
    other = FileRef(path="v/model.onnx.data", sha256="3" * 64, bytes=1)
    assert variant_source_sha256({"onnx": onnx}) != variant_source_sha256({"onnx": onnx, "onnx_data": data})
    assert variant_source_sha256({"onnx": onnx, "onnx_data": data}) != variant_source_sha256(
        {"onnx": onnx, "onnx_data": other}
    )


def test_timing_cache_is_per_trt_version_and_architecture(tmp_path):
    assert timing_cache_path(tmp_path, "11.4.0.106", "9.0") != timing_cache_path(tmp_path, "11.4.0.106", "8.0")
    assert timing_cache_path(tmp_path, "11.4.0.106", "9.0").name == "trt11.4.0.106.sm90.timing_cache"


def test_profile_rejects_nonsense():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile((8,), (1,), (32,))
    with pytest.raises(ValueError, match="ranks differ"):
        ShapeProfile((1,), (1, 2), (1, 2))


def test_a_missing_plan_is_an_engine_error_for_callers_that_skip_unavailable_backends(tmp_path):
    from engines.base import EngineError

    with pytest.raises(EngineError):
        select_plan(tmp_path, "v", source_sha256="a", precision=None, trt_version="11.4.0.106",
                    gpu_name="g", compute_capability="9.0")
