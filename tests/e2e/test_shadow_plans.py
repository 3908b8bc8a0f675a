"""End to end: shadow mode watches OpenVINO plans like any variant. `normfuse convert vit-digits` with bf16 and
int8 OpenVINO plans, `normfuse serve` with shadow rate 1.0, traffic on the plans; then /compare and /metrics
show each plan against the fp32 `unfused` with its engine and precision: paired latency ratios, error, top-1
agreement (the reduced-precision and int8 plans' live error monitor) and the gate record beside them.

Real processes, real ONNX Runtime, OpenVINO and NNCF. Nothing here depends on timing: the requests are sent
until enough shadow pairs are recorded, and only their presence and the errors are asserted."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engines.cpu import detect
from engines.manifest import read_manifest
from tests.e2e._plans import convert_digits_with_plans
from tests.service.server_process import Server

pytest.importorskip("openvino")
pytest.importorskip("nncf")
httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not detect().can_run_natively("bf16")[0], reason="this CPU has no AMX/AVX512-BF16")]
BF16 = "affine-ov-bf16"
PAIRS = 6  # shadow pairs wanted per watched plan


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    convert_digits_with_plans(repo, "unfused,affine,int8")
    return repo


@pytest.fixture(scope="module")
def watched(repo):
    """The plans to watch: the bf16 plan and the int8 OpenVINO plan, where they passed their gates here."""
    plans = read_manifest(repo / "digits").plans.plans
    names = [n for n, p in plans.items() if p.engine == "openvino" and p.servable and (n == BF16 or p.precision == "int8")]
    if BF16 not in names:
        pytest.skip(f"the bf16 plan failed its gate on this machine: {plans[BF16].reason}")
    return names


@pytest.fixture(scope="module")
def server(repo):
    server = Server(repo, env={"NORMFUSE_SHADOW_RATE": "1.0", "NORMFUSE_INTRA_OP_THREADS": "1",
                               "NORMFUSE_MAX_QUEUE_DELAY_MS": "1"})
    yield server
    server.stop()


def infer(url: str, version: str, images: np.ndarray) -> None:
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/digits/versions/{version}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def compare(server, watched):
    """/compare once every watched plan has PAIRS shadow pairs (requests one at a time, so unfused is idle)."""
    rng = np.random.default_rng(7)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        variants = httpx.get(f"{server.url}/v2/models/digits/compare", timeout=30).json()["variants"]
        short = [n for n in watched if variants[n]["shadow"]["pairs"] < PAIRS]
        if not short:
            return variants
        for name in short:
            infer(server.url, name, rng.uniform(0, 16, (4, 8, 8)).astype(np.float32))
    pytest.fail(f"fewer than {PAIRS} shadow pairs after 120 s: {[(n, variants[n]['shadow']) for n in watched]}")


def test_compare_shows_each_plan_against_unfused_with_its_engine_and_precision(compare, watched):
    for name in watched:
        row = compare[name]
        assert row["ready"] and row["engine"] == "openvino" and row["exact"] is False, (name, row)
        assert row["precision"] == ("bf16" if name == BF16 else "int8"), (name, row)
        shadow = row["shadow"]
        assert shadow["pairs"] >= PAIRS and shadow["ratio_median"] > 0, (name, shadow)
        # reduced precision and int8 really differ from fp32, and stay close: the live counterpart of the gate
        assert 0 < shadow["max_abs_error"] < 1.0, (name, shadow)
        assert shadow["agreement_mean"] >= 0.9 and shadow["agreement_min"] is not None, (name, shadow)
        assert row["accuracy"]["passed"] and row["accuracy"]["reference"].endswith("unfused fp32"), (name, row)
    baseline = compare["unfused"]
    assert (baseline["engine"], baseline["precision"], baseline["exact"]) == ("onnxruntime", "fp32", True)
    assert baseline["shadow"]["pairs"] == 0  # the baseline is never compared with itself
    ort_int8 = compare["int8"]  # ONNX Runtime's int8 variant: fp32 inputs and outputs, int8 inside
    assert (ort_int8["engine"], ort_int8["precision"], ort_int8["exact"]) == ("onnxruntime", "int8", False)
    fp32 = compare["affine-ov-fp32"]
    assert (fp32["engine"], fp32["precision"], fp32["exact"]) == ("openvino", "fp32", True)


def test_metrics_show_each_plans_shadow_series_and_its_precision(server, compare, watched):
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
               for s in family.samples]

    def value(name: str, variant: str) -> float:
        (hit,) = [s.value for s in samples if s.name == name and s.labels.get("variant") == variant]
        return hit

    for name in watched:
        pairs = compare[name]["shadow"]["pairs"]
        for series in ("normfuse_shadow_latency_ratio_count", "normfuse_shadow_abs_error_count",
                       "normfuse_shadow_agreement_count"):  # the agreement histogram: reduced precision as int8
            assert value(series, name) >= pairs, (series, name)
        (info,) = [s.labels for s in samples if s.name == "normfuse_engine_info" and s.labels["variant"] == name]
        assert info["runtime"] == info["backend"] == "openvino" and info["exact"] == "false"
        assert info["precision"] == compare[name]["precision"]
