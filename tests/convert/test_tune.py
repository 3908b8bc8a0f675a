"""`normfuse tune REPO/NAME`: re-times the plans on this machine (a real subprocess), without re-converting;
a CPU capped below bf16 neither times nor defaults to a bf16 plan; a model without plans is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convert.pipeline import ConvertOptions, convert
from convert.plans import PlanOptions
from engines.manifest import read_manifest
from tests.convert.test_plans import Benign, source

pytest.importorskip("openvino")


def tune(model_dir, *flags, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normfuse.cli", "tune", str(model_dir), *flags],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def model_dir(tmp_path):
    options = ConvertOptions(variants=["unfused"], samples=8, torch_artifacts=False, progress=False,
                             plans=PlanOptions(precision="bf16", rounds=5, threads=1))
    convert(source(Benign(), "b"), "b", tmp_path, options)
    return tmp_path / "b"


def test_tune_retimes_without_reconverting(model_dir):
    before = read_manifest(model_dir)
    onnx = (model_dir / "unfused" / "model.onnx").stat().st_mtime_ns
    result = tune(model_dir, "--threads", "1", "--rounds", "5")
    assert result.returncode == 0, result.stderr
    after = read_manifest(model_dir)
    assert "re-timed" in result.stdout and f"default plan: {after.plans.default}" in result.stdout
    assert after.plans.timing["retimed"] == "normfuse tune"
    assert after.created_at == before.created_at and after.variants == before.variants
    assert {n: p.gate for n, p in after.plans.plans.items()} == {n: p.gate for n, p in before.plans.plans.items()}
    assert (model_dir / "unfused" / "model.onnx").stat().st_mtime_ns == onnx


def test_tune_on_a_cpu_without_bf16_units_skips_bf16_plans(model_dir):
    result = tune(model_dir, "--threads", "1", "--rounds", "5", env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"})
    assert result.returncode == 0, result.stderr
    plans = read_manifest(model_dir).plans
    assert plans.cpu.isa_cap == "AVX512_CORE_VNNI" and "avx512_bf16" not in plans.cpu.flags
    assert plans.plans["unfused-ov-bf16"].latency_ms == {} and plans.default != "unfused-ov-bf16"
    assert "plan unfused-ov-bf16 is not timed on this CPU: bf16 needs" in result.stderr


def test_tune_without_plans_says_to_reconvert(tmp_path):
    convert(source(Benign(), "old"), "old", tmp_path, ConvertOptions(variants=["unfused"], samples=8,
                                                                      torch_artifacts=False, progress=False))
    result = tune(tmp_path / "old")
    assert result.returncode == 2 and "has no plans: re-convert it" in " ".join(result.stderr.split())
