"""Plans at conversion (convert.plans): OpenVINO fp32 plans are exact, bf16 plans are gated against the fp32
`unfused` ONNX Runtime reference, a bf16-hostile model's bf16 plan is refused and an exact plan stays default;
the flags' bad values are usage errors naming the flag; without OpenVINO only ONNX Runtime plans are built.

The conversions use tiny models and the real pipeline, ONNX Runtime and OpenVINO. No assertion depends on which
plan timed fastest: only on which plans may be the default.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert.models import Source
from convert.pipeline import ConvertOptions, convert
from convert.plans import PlanOptions
from engines.manifest import TensorInfo, read_manifest

pytest.importorskip("openvino")

IN, CLASSES = 16, 10


class Hostile(torch.nn.Module):
    """Logits that are small differences of large activations: y = x @ (B + δ) - x @ B with |B| ~ 10 and
    |δ| ~ 0.2. fp32 keeps δ (ulp at 10 is 1e-6); bf16 rounds B and B + δ apart by up to its ulp at 10 (0.06),
    so the logits drown in rounding noise and their argmax disagrees with fp32's."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        base = 10 * torch.randn(CLASSES, IN, generator=g)
        delta = 0.2 * torch.randn(CLASSES, IN, generator=g)
        self.norm = torch.nn.LayerNorm(IN)
        self.big = torch.nn.Linear(IN, 2 * CLASSES, bias=False)
        with torch.no_grad():
            self.big.weight.copy_(torch.cat([base + delta, base]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.big(self.norm(x))  # (n, 2C): two large, nearly equal halves
        return h[:, :CLASSES] - h[:, CLASSES:]


class Benign(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(IN)
        self.head = torch.nn.Sequential(torch.nn.Linear(IN, 64), torch.nn.GELU(), torch.nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def source(model: torch.nn.Module, name: str) -> Source:
    def sample(n: int) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(1).standard_normal((n, IN)).astype(np.float32)}

    return Source(name=name, description=name, model=model.eval(), task="image-classification",
                  inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, IN])],
                  outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, CLASSES])], sample_inputs=sample)


def convert_with_plans(tmp_path, model, name, **plan_options):
    options = ConvertOptions(variants=["unfused", "affine"], samples=8, torch_artifacts=False, progress=False,
                             benchmark_rounds=5, plans=PlanOptions(precision="bf16", rounds=5, threads=1,
                                                                   **plan_options))
    convert(source(model, name), name, tmp_path, options)
    return read_manifest(tmp_path / name)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return convert_with_plans(tmp_path_factory.mktemp("repo"), Hostile(), "hostile")


def test_the_bf16_plan_of_a_bf16_hostile_model_is_refused(hostile):
    plans = hostile.plans
    bf16 = plans.plans["unfused-ov-bf16"]
    assert not bf16.servable and not bf16.exact
    assert not bf16.gate.passed and bf16.gate.top1_agreement < 0.995
    assert any(f.startswith("top-1 agreement") for f in bf16.gate.failed)
    assert bf16.reason.startswith("gate failed: ")
    assert bf16.gate.gate == {"min_top1_agreement": 0.995, "min_cosine": 0.9999}


def test_the_hostile_models_default_stays_an_exact_fp32_plan(hostile):
    plans = hostile.plans
    default = plans.plans[plans.default]
    assert default.exact and default.precision == "fp32" and default.servable
    assert plans.plans["unfused-ov-fp32"].exact and plans.plans["unfused-ov-fp32"].servable  # fp32 OpenVINO: exact
    assert plans.plans["unfused"].engine == "onnxruntime"  # unfused stays the fp32 ONNX Runtime reference


def test_plans_record_the_cpu_and_url_safe_names(hostile):
    from engines.cpu import detect

    assert hostile.plans.cpu == detect()
    for name in hostile.plans.plans:
        assert name.replace("-", "").isalnum(), name
    assert set(hostile.plans.plans) >= {"unfused", "affine", "unfused-ov-fp32", "affine-ov-fp32", "affine-ov-bf16"}
    assert all("cpu_b8_median" in hostile.plans.plans[n].latency_ms for n in hostile.plans.servable())


def test_a_benign_models_bf16_plan_passes_its_gate(tmp_path):
    manifest = convert_with_plans(tmp_path, Benign(), "benign")
    bf16 = manifest.plans.plans["unfused-ov-bf16"]
    assert bf16.gate.passed and bf16.servable, bf16.gate
    assert 0 < bf16.gate.rel_l2 < 2e-2 and bf16.gate.cosine >= 0.9999


def test_fp32_precision_builds_only_exact_plans(tmp_path):
    options = ConvertOptions(variants=["unfused"], samples=8, torch_artifacts=False, progress=False,
                             plans=PlanOptions(precision="fp32", rounds=5, threads=1))
    manifest = convert(source(Benign(), "b"), "b", tmp_path, options)
    assert set(manifest.plans.plans) == {"unfused", "unfused-ov-fp32"}
    assert all(p.exact for p in manifest.plans.plans.values())


def test_without_openvino_only_onnxruntime_plans_are_built_and_it_is_said_once(tmp_path, monkeypatch, caplog):
    from convert import plans as plans_module

    monkeypatch.setattr(plans_module, "openvino_available", lambda: False)
    options = ConvertOptions(variants=["unfused"], samples=8, torch_artifacts=False, progress=False,
                             plans=PlanOptions(rounds=5, threads=1))
    with caplog.at_level("WARNING", logger="convert.plans"):
        manifest = convert(source(Benign(), "b"), "b", tmp_path, options)
    assert {p.engine for p in manifest.plans.plans.values()} == {"onnxruntime"}
    assert "OpenVINO is not installed" in manifest.plans.skipped["openvino"]
    assert sum("OpenVINO is not installed" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--cpu-precision", "fp8", "argument --cpu-precision: invalid choice: 'fp8'"),
    ("--plan-min-cosine", "1.5", "argument --plan-min-cosine: expected a number in [0, 1], got 1.5"),
    ("--plan-min-agreement", "x", "argument --plan-min-agreement: expected a number in [0, 1], got 'x'"),
    ("--engines", "tensorrt", "argument --engines: expected onnxruntime or onnxruntime,openvino; got 'tensorrt'"),
])
def test_out_of_range_flags_are_usage_errors_naming_the_flag(flag, value, message, capsys):
    from normfuse.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser("convert").parse_args(["convert", "x", "--name", "m", "--repo", "r", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_options_refuse_nonsense_naming_the_flag():
    with pytest.raises(ValueError, match="--plan-min-cosine must be a number in"):
        PlanOptions(min_cosine=2.0)
    with pytest.raises(ValueError, match="--cpu-precision must be one of auto, fp32, bf16, f16"):
        PlanOptions(precision="int4")


def test_the_int8_openvino_plan_keeps_the_better_quantization_and_is_never_default_without_the_flag(tmp_path):
    pytest.importorskip("nncf")
    import engines
    from convert.ov_int8 import CANDIDATES

    options = ConvertOptions(variants=["unfused"], samples=8, torch_artifacts=False, progress=False,
                             plans=PlanOptions(precision="fp32", rounds=5, threads=1, int8=True))
    manifest = convert(source(Benign(), "q"), "q", tmp_path, options)
    (name,) = [n for n in manifest.plans.plans if n.endswith("-ov-int8")]
    plan = manifest.plans.plans[name]
    assert name in CANDIDATES and plan.precision == "int8" and not plan.exact and plan.gate is not None
    assert plan.gate.gate == {"min_top1_agreement": 0.99, "min_cosine": 0.999}  # the int8 gate, as for `int8`
    assert set(plan.quantization["candidates"]) == set(CANDIDATES) and plan.quantization["kept"] == name
    kept = plan.quantization["candidates"]
    assert all(kept[name]["cosine"] >= kept[other]["cosine"] for other in CANDIDATES if kept[other].get("passed"))
    assert (tmp_path / "q" / plan.files["openvino"].path).is_file()
    assert not any((tmp_path / "q" / other).exists() for other in CANDIDATES if other != name)  # the loser is gone
    assert manifest.plans.default != name  # lossy: never the default without --allow-lossy-default
    if plan.servable:
        with engines.load(tmp_path, "q", name) as engine:
            assert engine.backend == "openvino" and engine.describe()["precision"] == "int8"
            x = source(Benign(), "q").sample_inputs(4)
            assert engine.infer(x)["y"].shape == (4, CLASSES)
