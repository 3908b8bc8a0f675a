"""The manifest written by a real conversion: round trip, sha256 checks, servability, clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _tiny_artifact import IN, build_repo, expected

import engines
from engines.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    list_models,
    read_manifest,
    sha256_file,
    write_manifest,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"), include_bound=True)


@pytest.fixture
def model_dir(pristine, tmp_path):
    """A private copy per test, so tampering in one test cannot leak into another."""
    return shutil.copytree(pristine, tmp_path / "repo" / "tiny")


def test_the_manifest_records_what_the_issue_asks_for(model_dir):
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert data["name"] == "tiny" and data["source"] == "tiny" and data["created_at"]
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(data["tools"])
    assert data["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, IN]}]
    assert data["default_variant"] == "unfused"
    unfused = data["variants"]["unfused"]
    assert unfused["servable"] and unfused["exact"] and not unfused["benchmark_only"]
    assert set(unfused["files"]) == {"onnx", "torch"}
    for ref in unfused["files"].values():
        assert ref["sha256"] == sha256_file(model_dir / ref["path"])
    [parity] = unfused["parity"]  # the exported ONNX in ORT vs the original torch model, on held-out data
    assert parity["passed"] and parity["candidate"].startswith("onnxruntime") and parity["samples"] == 8
    assert parity["rel_l2"] <= parity["gate"]["rel_l2"]
    assert unfused["op_census"]["LayerNormalization"] == 1


def test_round_trip(model_dir, tmp_path):
    manifest = read_manifest(model_dir)
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again == manifest
    assert Manifest.model_validate_json(again.model_dump_json()) == manifest


def test_the_benchmark_only_bound_is_never_servable(model_dir):
    bound = read_manifest(model_dir).variants["nonorm"]
    assert bound.benchmark_only and not bound.servable and not bound.exact
    with pytest.raises(ManifestError, match="'nonorm' of 'tiny' is not servable .*benchmark-only"):
        engines.load(model_dir.parent, "tiny", "nonorm")
    with engines.load(model_dir.parent, "tiny", "nonorm", benchmark=True) as engine:  # measurement only
        assert engine.infer({"x": np.ones((2, IN), np.float32)})["y"].shape == (2, 3)


def test_tampered_onnx_is_refused(model_dir):
    path = model_dir / "unfused" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        engines.load(model_dir.parent, "tiny")
    message = str(info.value)
    assert "variant 'unfused': onnx file" in message and "sha256" in message
    assert "modified after conversion" in message and "re-run `normfuse convert`" in message


def test_tampered_torch_artifact_is_refused_even_for_onnxruntime(model_dir):
    (model_dir / "unfused" / "model.pt").write_bytes(b"not the program")
    with pytest.raises(ManifestError, match="torch file .* has sha256"):
        engines.load(model_dir.parent, "tiny")


def test_missing_file_is_refused(model_dir):
    (model_dir / "unfused" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="onnx file .* is missing"):
        engines.load(model_dir.parent, "tiny")


def test_untouched_repository_loads_and_answers(model_dir):
    inputs = np.random.default_rng(3).standard_normal((4, IN)).astype(np.float32)
    with engines.load(model_dir.parent, "tiny") as engine:
        np.testing.assert_allclose(engine.infer({"x": inputs})["y"], expected(inputs), rtol=1e-5, atol=1e-5)


def test_unknown_model_variant_and_backend_are_named(model_dir):
    with pytest.raises(ManifestError, match=r"no model 'nope' in repository .* \(models there: tiny\)"):
        engines.load(model_dir.parent, "nope")
    with pytest.raises(ManifestError, match="has no variant 'affine'; variants: unfused, nonorm"):
        engines.load(model_dir.parent, "tiny", "affine")
    with pytest.raises(engines.EngineError, match="unknown backend 'tflite'"):
        engines.load(model_dir.parent, "tiny", backend="tflite")


def test_a_corrupt_manifest_is_refused(model_dir):
    (model_dir / MANIFEST_NAME).write_text('{"name": "tiny"}')
    with pytest.raises(ManifestError, match="is not a valid normfuse manifest"):
        engines.load(model_dir.parent, "tiny")


def test_a_conversion_in_progress_is_not_listed(model_dir):
    repo = model_dir.parent
    shutil.copytree(model_dir, repo / ".tiny.partial-abc123")  # what convert stages before its rename
    assert list_models(repo) == ["tiny"]
