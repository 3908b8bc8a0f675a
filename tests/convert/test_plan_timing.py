"""The plan timing's rounds, on a fake clock (no timing in tests): a slow model gets single runs, and a plan that
looks faster than unfused is topped up to the MIN_ROUNDS rounds its 95% bound needs to become the default; a plan
that is not faster is not. (ViT-S on one core, ~1 s a batch, used to get 3 rounds: no plan could win.)"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

from convert import plan_timing
from convert.default_pick import MIN_ROUNDS
from engines.plans import Plan

SECONDS = {"unfused": 1.0, "fast-ov-bf16": 0.4, "same-ov-fp32": 1.0}  # a fake clock: seconds per call


class FakeEngine(SimpleNamespace):
    def close(self) -> None:
        pass


def plan(name: str, engine: str = "openvino", precision: str = "bf16") -> Plan:
    return Plan(name=name, variant="unfused", engine=engine, precision=precision, exact=precision == "fp32",
                servable=True)


def test_a_promising_plan_gets_the_rounds_its_bound_needs(monkeypatch):
    calls: dict[str, int] = {}

    def open_plan(model_dir, manifest, p, threads):
        return contextlib.nullcontext(FakeEngine(name=p.name)) if p.name != "unfused" else FakeEngine(name="unfused")

    def timed(engine, inputs):
        calls[engine.name] = calls.get(engine.name, 0) + 1
        return SECONDS[engine.name]

    monkeypatch.setattr("convert.plans.open_plan", open_plan)
    monkeypatch.setattr(plan_timing, "timed", timed)
    plans = {"unfused": plan("unfused", "onnxruntime", "fp32"), "fast-ov-bf16": plan("fast-ov-bf16"),
             "same-ov-fp32": plan("same-ov-fp32", precision="fp32")}
    options = SimpleNamespace(batch=2, rounds=20, threads=1, allow_lossy_default=False)
    pairs = plan_timing.time_plans(None, None, plans, {"x": np.zeros((4, 3), np.float32)}, options)
    assert len(pairs["fast-ov-bf16"]) == MIN_ROUNDS  # 6 s budget / (2 × 1 s) = 3 rounds, topped up
    assert len(pairs["same-ov-fp32"]) == 3  # not faster: not topped up
    assert calls["fast-ov-bf16"] == 1 + MIN_ROUNDS  # warm-up + single runs (a 1 s model is not best-of-3)
    manifest = SimpleNamespace(default_variant="unfused", allow_lossy_default=False)
    monkeypatch.setattr(plan_timing, "admissible", lambda p, m, lossy: True)
    assert plan_timing.pick_default(plans, pairs, manifest, options)[0] == "fast-ov-bf16"
