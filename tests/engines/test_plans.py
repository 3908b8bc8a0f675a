"""engines.plans: the plan schema in the manifest, and choose_servable on recorded CPUs (tests/engines/cpuinfo):
the default plan where the CPU runs it natively, else the fastest plan it does run, with the reason; manifests
without plans still load and serve their default variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_artifact import build_repo
from pydantic import ValidationError

from engines.cpu import detect
from engines.manifest import Manifest, read_manifest, write_manifest
from engines.plans import Plan, PlanGate, PlanSet, choose_servable, plan_name

SAMPLES = Path(__file__).parent / "cpuinfo"
GATE = {"min_top1_agreement": 0.995, "min_cosine": 0.9999}


def cpu(name: str, cap: str | None = None):
    return detect(SAMPLES / f"{name}.txt", {"ONEDNN_MAX_CPU_ISA": cap} if cap else {})


def plan(name, engine, precision, median, **extra) -> Plan:
    exact = precision == "fp32"
    gate = None if exact else PlanGate(passed=True, samples=64, rel_l2=5e-3, cosine=0.99999, top1_agreement=1.0,
                                       gate=GATE)
    return Plan(name=name, variant="unfused", engine=engine, precision=precision, exact=exact, servable=True,
                gate=gate, latency_ms={"cpu_b8_median": median}, **extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model whose manifest was written before plans existed (no `plans` key at all)."""
    model_dir = build_repo(tmp_path_factory.mktemp("repo"), include_bound=False)
    data = json.loads((model_dir / "manifest.json").read_text())
    data.pop("plans", None)
    (model_dir / "manifest.json").write_text(json.dumps(data))
    return model_dir


@pytest.fixture(scope="module")
def old(model_dir) -> Manifest:
    return read_manifest(model_dir)


@pytest.fixture(scope="module")
def planned(old) -> Manifest:
    plans = {p.name: p for p in (plan("unfused", "onnxruntime", "fp32", 10.0),
                                 plan("unfused-ov-fp32", "openvino", "fp32", 8.0),
                                 plan("unfused-ov-bf16", "openvino", "bf16", 3.0))}
    return old.model_copy(update={"plans": PlanSet(cpu=cpu("xeon-sapphire-rapids-amx"), plans=plans,
                                                   default="unfused-ov-bf16")})


def test_names_are_url_safe_and_unfused_stays_the_ort_reference():
    assert plan_name("unfused", "onnxruntime", "fp32") == "unfused"
    assert plan_name("affine", "openvino", "bf16") == "affine-ov-bf16"


def test_the_default_is_kept_where_it_was_timed(planned):
    choice = choose_servable(planned, cpu("xeon-sapphire-rapids-amx"))
    assert choice.plan == "unfused-ov-bf16" and choice.refused == {}
    assert "the CPU it was timed on" in choice.reason


def test_the_default_is_kept_on_another_cpu_that_runs_it_natively(planned):
    choice = choose_servable(planned, cpu("amd-epyc-zen4"))  # AVX512-BF16 without AMX: bf16 still native
    assert choice.plan == "unfused-ov-bf16" and "runs it natively" in choice.reason


@pytest.mark.parametrize(("machine", "cap"), [("xeon-cascade-lake-vnni", None), ("xeon-haswell-avx2", None),
                                               ("xeon-sapphire-rapids-amx", "AVX512_CORE_VNNI")])
def test_without_bf16_units_the_fastest_native_plan_is_served_with_the_reason(planned, machine, cap):
    choice = choose_servable(planned, cpu(machine, cap))
    assert choice.plan == "unfused-ov-fp32"  # 8 ms: faster than ORT's 10 ms, and fp32 runs anywhere
    assert set(choice.refused) == {"unfused-ov-bf16"}
    assert "bf16 needs AMX_BF16 or AVX512_BF16" in choice.refused["unfused-ov-bf16"]
    assert "'unfused-ov-bf16' is not native here" in choice.reason and "'unfused-ov-fp32'" in choice.reason


def test_the_fallback_never_picks_a_lossy_int8_plan_without_allow_lossy_default(planned):
    int8 = plan("smoothed-ov-int8", "openvino", "int8", 1.0)  # the fastest of all, and VNNI runs it natively
    plans = planned.plans.model_copy(update={"plans": {**planned.plans.plans, int8.name: int8}})
    vnni = cpu("xeon-cascade-lake-vnni")
    assert choose_servable(planned.model_copy(update={"plans": plans}), vnni).plan == "unfused-ov-fp32"
    lossy_ok = planned.model_copy(update={"plans": plans, "allow_lossy_default": True})
    assert choose_servable(lossy_ok, vnni).plan == "smoothed-ov-int8"


def test_a_manifest_without_plans_serves_its_default_variant(old):
    assert old.plans is None
    choice = choose_servable(old, cpu("xeon-haswell-avx2"))
    assert choice.plan == old.default_variant and "no plans" in choice.reason


def test_plans_round_trip_through_manifest_json(planned, tmp_path):
    write_manifest(tmp_path, planned)
    again = read_manifest(tmp_path)
    assert again.plans == planned.plans
    assert again.plans.cpu.flags[-2:] == ["amx_bf16", "amx_int8"]


def test_the_default_plan_must_be_servable(planned):
    plans = dict(planned.plans.plans)
    plans["unfused-ov-bf16"] = plans["unfused-ov-bf16"].model_copy(update={"servable": False})
    with pytest.raises(ValidationError, match="plans.default 'unfused-ov-bf16' must name a servable plan"):
        PlanSet(cpu=planned.plans.cpu, plans=plans, default="unfused-ov-bf16")


def test_engines_load_runs_a_variant_on_openvino_at_a_precision(model_dir):
    pytest.importorskip("openvino")
    import numpy as np
    from _tiny_artifact import IN, expected

    import engines

    x = np.random.default_rng(0).standard_normal((4, IN)).astype(np.float32)
    with engines.load(model_dir.parent, "tiny", backend="openvino", precision="bf16") as engine:
        assert engine.backend == "openvino" and engine.describe()["precision"] == "bf16"
        np.testing.assert_allclose(engine.infer({"x": x})["y"], expected(x), atol=5e-2)


def test_engines_load_finds_a_plan_once_and_runs_it_on_its_engine(planned, model_dir, tmp_path, monkeypatch):
    """engines.load looks the version up among the plans once (pick_plan) and hands the plan on."""
    pytest.importorskip("openvino")
    import shutil

    import numpy as np
    from _tiny_artifact import IN, expected

    import engines
    import engines.plans

    copy = tmp_path / "repo" / "tiny"
    shutil.copytree(model_dir, copy)
    write_manifest(copy, planned)
    calls = []
    monkeypatch.setattr(engines, "find_plan", lambda *a: calls.append(a) or engines.plans.find_plan(*a))
    x = np.random.default_rng(0).standard_normal((4, IN)).astype(np.float32)
    with engines.load(copy.parent, "tiny", "unfused-ov-fp32") as engine:
        assert engine.backend == "openvino" and engine.describe()["precision"] == "fp32"
        np.testing.assert_allclose(engine.infer({"x": x})["y"], expected(x), rtol=1e-5, atol=1e-5)
    assert [version for _, version in calls] == ["unfused-ov-fp32"]
