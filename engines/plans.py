"""Plans: one variant on one engine at one precision, the schema convert writes into the manifest and the server
reads, and the choice of the plan to serve on the machine at hand.

    plan "affine-ov-bf16" = (variant affine, engine openvino, precision bf16)

A plan's name is its served version: `<variant>` for the ONNX Runtime fp32 plan (the variants as before, so
`unfused` stays the fp32 reference), `<variant>-ov-<precision>` for OpenVINO ("-" not ".": a version is a URL
path segment, and dots read as file extensions to proxies and to the OIP clients' URL builders).

fp32 plans of exact variants are exact; bf16/f16 plans are *reduced precision*: servable only with a passed gate
(`PlanGate`: agreement and cosine with the fp32 `unfused` ONNX Runtime reference on held-out data). The set
records the CPU the plans were timed on; `choose_servable(manifest, cpu)` keeps the convert-time default where
this CPU runs its precision natively (engines.cpu), and otherwise falls back to the fastest plan this CPU runs
that may be a default, saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.cpu import CpuInfo
from engines.fileref import FileRef

Engine = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "f16", "int8"]
OPENVINO_TAG = "ov"


# a plan's precision -> OpenVINO's INFERENCE_PRECISION_HINT. Always set: OpenVINO's own default on a CPU with
# bf16 units is bf16, which would silently make an fp32 plan lossy. int8: an NNCF IR's quantized layers run in
# int8, its other ops in f32 (what its gate measured).
OPENVINO_PRECISIONS = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16", "int8": "f32"}
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")


def openvino_config(precision: str, threads: int | None = None, streams: int | None = None,
                    hint: str = "LATENCY") -> dict[str, str]:
    """The compile_model properties of an OpenVINO plan (strings, as OpenVINO documents them): one definition for
    the engine that serves the plan and for convert, which gates and times it."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
    if hint not in OPENVINO_HINTS:
        raise ValueError(f"performance hint must be one of {', '.join(OPENVINO_HINTS)}, got {hint!r}")
    config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": hint}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if streams is not None:
        config["NUM_STREAMS"] = str(streams)
    return config


def plan_name(variant: str, engine: str, precision: str) -> str:
    """The served version of a plan: 'affine' (ORT fp32), 'affine-ov-bf16' (OpenVINO bf16)."""
    if engine == "onnxruntime" and precision == "fp32":
        return variant
    if engine == "openvino":
        return f"{variant}-{OPENVINO_TAG}-{precision}"
    raise ValueError(f"no plan name for {engine} {precision}")


PlanFile = FileRef  # a file a plan adds to its variant's (an OpenVINO int8 IR): path inside the model's directory, sha256, size


class PlanGate(BaseModel):
    """A reduced-precision plan against the fp32 `unfused` ONNX Runtime reference on held-out inputs."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    passed: bool
    reference: str = "onnxruntime cpu unfused fp32"
    samples: int
    rel_l2: float
    cosine: float
    top1_agreement: float | None = None
    task: dict[str, float] = Field(default_factory=dict, description="task metric where the source has labels")
    gate: dict[str, float] = Field(description="e.g. {'min_top1_agreement': 0.995, 'min_cosine': 0.9999}")
    failed: list[str] = Field(default_factory=list)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the served version, URL-safe: 'affine', 'affine-ov-bf16'")
    variant: str
    engine: Engine
    precision: Precision
    exact: bool = Field(description="fp32 plan of an exact variant (checked against unfused at fp32 tolerance)")
    servable: bool = Field(description="exact and within parity, or reduced precision within its gate")
    reason: str = Field("", description="why it is not servable")
    files: dict[str, PlanFile] = Field(default_factory=dict, description="beyond the variant's ONNX (int8 IR)")
    gate: PlanGate | None = Field(None, description="reduced precision: the record its gate judged")
    latency_ms: dict[str, float] = Field(default_factory=dict, description="median, ratio to unfused, upper 95%")
    quantization: dict[str, Any] = Field(default_factory=dict, description="int8: tool, candidates compared, kept")


class Choice(BaseModel):
    """The plan a server serves by default on its CPU, and why."""

    plan: str
    reason: str
    refused: dict[str, str] = Field(default_factory=dict, description="plans this CPU cannot run natively")


class PlanSet(BaseModel):
    """Every plan built for a model, the default, and the CPU they were timed on."""

    model_config = ConfigDict(extra="forbid")

    cpu: CpuInfo = Field(description="the machine the plans were gated and timed on")
    plans: dict[str, Plan]
    default: str = Field(description="the fastest plan that is exact or reduced precision within its gate")
    timing: dict[str, float | int | str] = Field(default_factory=dict, description="batch, rounds, threads")
    skipped: dict[str, str] = Field(default_factory=dict, description="plans not built here, with the reason")
    served: Choice | None = Field(None, description="set by a server for its own CPU (service.plans); never written")

    @model_validator(mode="after")
    def _default_is_servable(self) -> PlanSet:
        plan = self.plans.get(self.default)
        if plan is None or not plan.servable:
            raise ValueError(f"plans.default {self.default!r} must name a servable plan")
        return self

    def servable(self) -> list[str]:
        return [name for name, plan in self.plans.items() if plan.servable]


def runnable(plan: Plan, cpu: CpuInfo) -> tuple[bool, str]:
    """Whether this CPU runs the plan at its speed ((False, why) for e.g. bf16 without AMX/AVX512-BF16).
    ONNX Runtime's CPU plans (fp32, and its int8 which has an AVX2 path) run anywhere."""
    if plan.engine == "onnxruntime":
        return True, "ONNX Runtime CPU"
    return cpu.can_run_natively(plan.precision)


def choose_servable(manifest, cpu: CpuInfo) -> Choice:
    """The default plan if this CPU runs it natively; otherwise the fastest plan it runs that may be a default
    (`admissible`; by the convert-time median, a plan without timings last), else the manifest's default variant.
    A manifest without plans serves its default variant, as before."""
    plans: PlanSet | None = getattr(manifest, "plans", None)
    if plans is None:
        return Choice(plan=manifest.default_variant, reason="no plans in the manifest: its default variant")
    refused = {}
    for name in plans.servable():
        ok, why = runnable(plans.plans[name], cpu)
        if not ok:
            refused[name] = why
    if plans.default not in refused:
        same = cpu.flags == plans.cpu.flags
        where = "the CPU it was timed on" if same else f"this CPU ({cpu.summary()}) runs it natively"
        return Choice(plan=plans.default, reason=f"the convert-time default ({where})", refused=refused)
    usable = [n for n in plans.servable()
              if n not in refused and admissible(plans.plans[n], manifest, manifest.allow_lossy_default)]
    usable.sort(key=lambda n: _median(plans.plans[n]))
    fallback = usable[0] if usable else manifest.default_variant
    return Choice(plan=fallback, refused=refused,
                  reason=f"the default plan {plans.default!r} is not native here ({refused[plans.default]}); "
                         f"serving {fallback!r}, the fastest plan this CPU runs natively")


def admissible(plan: Plan, manifest, allow_lossy: bool) -> bool:
    """May this plan be a default? Servable, and exact (an ONNX Runtime one without a lost fusion), reduced
    precision within its gate, or int8 only when lossy defaults are allowed (--allow-lossy-default)."""
    if not plan.servable:
        return False
    variant = manifest.variants.get(plan.variant)
    if plan.engine == "onnxruntime" and variant is not None and any(f.startswith("lost-fusion") for f in variant.flags):
        return False
    if plan.exact:
        return True
    if plan.precision == "int8":
        return allow_lossy
    return plan.gate is not None and plan.gate.passed


def _median(plan: Plan) -> float:
    return next((v for k, v in plan.latency_ms.items() if k.endswith("_median")), float("inf"))


def find_plan(manifest, version: str | None) -> Plan | None:
    """The OpenVINO plan a version names ('affine-ov-bf16'); None for a variant (ONNX Runtime plans are the
    variants themselves) or a manifest without plans."""
    plans: PlanSet | None = getattr(manifest, "plans", None)
    plan = plans.plans.get(version) if plans is not None and version else None
    return plan if plan is not None and plan.engine != "onnxruntime" else None


def plan_artifacts(model_dir: Path, plan: Plan) -> dict:
    """role -> engines.manifest.Artifact for the files a plan adds to its variant's (an OpenVINO int8 IR:
    `openvino`, `openvino_weights`): each inside the model's directory, read once and checked like every file."""
    from engines.manifest import artifact

    return {role: artifact(model_dir, plan.name, role, ref) for role, ref in plan.files.items()}
