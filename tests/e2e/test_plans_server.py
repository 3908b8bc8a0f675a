"""End to end: `normfuse convert vit-digits` with OpenVINO plans, then `normfuse serve` serving a bf16 plan as a
version (metadata, index, metrics say engine, precision, exact), and a server whose CPU is capped below bf16
(ONEDNN_MAX_CPU_ISA) refusing the bf16 plans with the reason while serving the rest.

Real processes, real ONNX Runtime and OpenVINO; the default plan is not asserted (it depends on timings)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.cpu import detect
from engines.manifest import read_manifest
from tests.e2e._plans import convert_digits_with_plans
from tests.service.server_process import Server

pytest.importorskip("openvino")
httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BF16 = "affine-ov-bf16"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    result = convert_digits_with_plans(repo, "unfused,affine")
    assert "plans on " in result.stdout and f"  {BF16} " in result.stdout and "default plan: " in result.stdout
    return repo


def infer(url: str, version: str, images: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/digits/versions/{version}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_the_manifest_records_gated_plans_and_the_cpu(repo):
    plans = read_manifest(repo / "digits").plans
    assert plans.cpu == detect()
    bf16 = plans.plans[BF16]
    assert bf16.engine == "openvino" and bf16.precision == "bf16" and not bf16.exact
    assert bf16.gate.samples >= 64 and bf16.gate.gate == {"min_top1_agreement": 0.995, "min_cosine": 0.9999}
    assert "test_accuracy" in bf16.gate.task  # vit-digits has labels: the task metric is recorded
    assert plans.plans["affine-ov-fp32"].exact and plans.plans["unfused"].engine == "onnxruntime"


@pytest.mark.skipif(not detect().can_run_natively("bf16")[0], reason="this CPU has no AMX/AVX512-BF16")
def test_a_bf16_plan_is_served_as_a_version(repo):
    if not read_manifest(repo / "digits").plans.plans[BF16].servable:
        pytest.skip("the bf16 plan failed its gate on this machine (recorded in the manifest)")
    server = Server(repo)
    try:
        images = np.random.default_rng(3).uniform(0, 16, (4, 8, 8)).astype(np.float32)
        reduced, reference = infer(server.url, BF16, images), infer(server.url, "unfused", images)
        np.testing.assert_allclose(reduced, reference, atol=0.1)
        assert (reduced.argmax(1) == reference.argmax(1)).all()
        meta = httpx.get(f"{server.url}/v2/models/digits/versions/{BF16}").json()
        expected = {"variant": BF16, "exact": False, "engine": "openvino", "precision": "bf16"}
        assert {k: meta["parameters"][k] for k in expected} == expected
        assert BF16 in meta["versions"]
        default = httpx.get(f"{server.url}/v2/models/digits").json()["parameters"]
        assert default["default_reason"].startswith("the convert-time default")  # this CPU timed the plans
        assert default["variant"] == read_manifest(repo / "digits").plans.default
        metrics = httpx.get(f"{server.url}/metrics").text
        info = next(line for line in metrics.splitlines()
                    if line.startswith("normfuse_engine_info{") and f'variant="{BF16}"' in line)
        assert 'runtime="openvino"' in info and 'precision="bf16"' in info and 'exact="false"' in info
    finally:
        server.stop()


def test_a_cpu_without_bf16_units_refuses_the_bf16_plans_and_serves_the_rest(repo):
    server = Server(repo, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"})
    try:
        rows = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
        refused = {r["version"]: r for r in rows if r["version"].endswith("-ov-bf16")}
        assert set(refused) == {"unfused-ov-bf16", BF16} - {v for v, p in _unservable(repo)}
        for row in refused.values():
            assert row["state"] == "UNAVAILABLE" and "bf16 needs AMX_BF16 or AVX512_BF16" in row["reason"]
        assert {r["version"]: r["state"] for r in rows}["affine-ov-fp32"] == "READY"
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        default = httpx.get(f"{server.url}/v2/models/digits").json()["parameters"]
        assert not default["variant"].endswith("bf16")
        response = httpx.post(f"{server.url}/v2/models/digits/versions/{BF16}/infer", json={"inputs": []})
        assert response.status_code == 404 and BF16 not in response.json()["error"].split("versions:")[-1]
        assert "not loaded: bf16 needs" in server.output()
    finally:
        server.stop()


def _unservable(repo):
    plans = read_manifest(repo / "digits").plans
    return [(n, p) for n, p in plans.plans.items() if not p.servable]
