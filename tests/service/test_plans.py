"""service.plans in process: which plans become versions on a given CPU, the default and its reason, the index
rows of the plans not loaded, and a manifest without plans left as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.cpu import detect
from engines.plans import Plan, PlanGate
from service import plans as service_plans
from service.plans import parameters, refused_rows, served_manifest

SAMPLES = Path(__file__).parents[1] / "engines" / "cpuinfo"


def cpu(name: str):
    return detect(SAMPLES / f"{name}.txt", {})


def plan(name, engine, precision, median) -> Plan:
    exact = precision == "fp32"
    gate = None if exact else PlanGate(passed=True, samples=64, rel_l2=5e-3, cosine=0.99999, top1_agreement=1.0,
                                       gate={"min_top1_agreement": 0.995, "min_cosine": 0.9999})
    return Plan(name=name, variant="unfused", engine=engine, precision=precision, exact=exact, servable=True,
                gate=gate, latency_ms={"cpu_b8_median": median})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from engines.manifest import read_manifest
    from engines.plans import PlanSet
    from tests.engines._tiny_artifact import build_repo

    model_dir = build_repo(tmp_path_factory.mktemp("repo"), include_bound=False)
    plans = {p.name: p for p in (plan("unfused", "onnxruntime", "fp32", 10.0),
                                 plan("unfused-ov-fp32", "openvino", "fp32", 8.0),
                                 plan("unfused-ov-bf16", "openvino", "bf16", 3.0))}
    return read_manifest(model_dir).model_copy(update={"plans": PlanSet(
        cpu=cpu("xeon-sapphire-rapids-amx"), plans=plans, default="unfused-ov-bf16")})


def test_on_an_amx_cpu_every_plan_is_a_version_and_bf16_the_default(manifest):
    served = served_manifest(manifest, cpu("xeon-sapphire-rapids-amx"))
    assert set(served.servable()) == {"unfused", "unfused-ov-fp32", "unfused-ov-bf16"}
    assert served.default_variant == "unfused-ov-bf16"
    bf16 = served.variants["unfused-ov-bf16"]
    assert not bf16.exact and bf16.accuracy.passed and bf16.files == manifest.variants["unfused"].files
    assert parameters(served, "unfused-ov-bf16") == {"engine": "openvino", "precision": "bf16",
                                                     "default_reason": served.plans.served.reason}
    assert refused_rows("tiny", served) == []


def test_only_the_default_plan_when_asked(manifest):
    served = served_manifest(manifest, cpu("xeon-sapphire-rapids-amx"), only_default=True)
    assert set(served.servable()) == {"unfused", "unfused-ov-bf16"} and served.default_variant == "unfused-ov-bf16"


def test_on_an_avx2_cpu_bf16_is_not_loaded_and_listed_with_the_reason(manifest, caplog):
    with caplog.at_level("WARNING", logger="service.plans"):
        served = served_manifest(manifest, cpu("xeon-haswell-avx2"))
    assert "unfused-ov-bf16" not in served.variants and served.default_variant == "unfused-ov-fp32"
    assert "is not native here" in served.plans.served.reason
    (row,) = refused_rows("tiny", served)
    assert row["version"] == "unfused-ov-bf16" and row["state"] == "UNAVAILABLE"
    assert "bf16 needs AMX_BF16 or AVX512_BF16" in row["reason"]
    assert "plan unfused-ov-bf16 not loaded: bf16 needs" in caplog.text


def test_without_openvino_the_default_variant_is_served(manifest, monkeypatch):
    monkeypatch.setattr(service_plans.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else __import__("importlib").util.find_spec(name))
    served = served_manifest(manifest, cpu("xeon-sapphire-rapids-amx"))
    assert set(served.servable()) == {"unfused"} and served.default_variant == "unfused"
    assert "OpenVINO is not installed" in served.plans.served.reason
    assert {r["version"] for r in refused_rows("tiny", served)} == {"unfused-ov-fp32", "unfused-ov-bf16"}


def test_a_manifest_without_plans_is_served_as_it_is(manifest):
    old = manifest.model_copy(update={"plans": None})
    assert served_manifest(old, cpu("xeon-haswell-avx2")) is old
    assert refused_rows("tiny", old) == [] and parameters(old, "unfused") == {}
