"""Plans at conversion: each servable variant on each CPU engine at each precision this CPU runs natively, gated
against the fp32 `unfused` ONNX Runtime reference, timed against it, the fastest admissible one the default.

    converted model (manifest + ONNX files) + held-out inputs
      -> ORT plans (the variants as they are) + OpenVINO plans <variant>-ov-<fp32|bf16|f16>
      -> fp32 plans: parity with unfused at the fp32 tolerance (exact) | bf16/f16: the reduced-precision gate
      -> timed, interleaved and paired with unfused (convert.plan_timing) -> PlanSet in manifest.plans

The plans are compiled with the properties the serving engine uses (engines.plans.openvino_config, run by
convert.plan_runner), so the gate judges what will be served. OpenVINO missing here -> ONNX Runtime plans only, said once.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engines.cpu import CpuInfo, detect
from engines.manifest import Manifest, accuracy_figures, judge
from engines.plans import Plan, PlanGate, PlanSet, plan_name

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16", "f16")
ENGINES = ("onnxruntime", "openvino")
REDUCED = ("bf16", "f16")
# An OpenVINO fp32 plan is exact when it matches ORT's unfused run as two fp32 runtimes match each other
# (different kernels, summation orders): the pipeline's own fp32 parity gate between torch and ORT.
FP32_REL_L2 = 1e-4
# The reduced-precision gate's defaults; docs/plans.md gives the figures they were set from.
MIN_AGREEMENT = 0.995
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class PlanOptions:
    """How plans are built (CLI: --cpu-precision, --engines, --plan-min-*)."""

    precision: str = "auto"          # auto: fp32 + every reduced precision this CPU runs natively; fp32: exact only
    engines: tuple[str, ...] = ENGINES
    min_agreement: float = MIN_AGREEMENT
    min_cosine: float = MIN_COSINE
    eval_samples: int = 256          # held-out inputs the gate measures (capped by output size, as parity is)
    batch: int = 8                   # the timed batch
    rounds: int = 8                  # paired rounds per plan (fewer for slow models: convert.plan_timing)
    threads: int | None = None       # engine threads for gating and timing (None: all cores)
    allow_lossy_default: bool = False  # an int8 plan may become the default
    int8: bool = False               # also the NNCF int8 OpenVINO plan (convert.ov_int8; asked by --variants ...,int8)
    int8_min_agreement: float = 0.99  # the int8 plan's gate: the lossy variants' (--int8-min-*)
    int8_min_cosine: float = 0.999

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"--cpu-precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or "onnxruntime" not in self.engines:
            raise ValueError(f"--engines must list onnxruntime (the reference) and optionally openvino, got "
                             f"{','.join(self.engines)}")
        for flag, value in (("--plan-min-agreement", self.min_agreement), ("--plan-min-cosine", self.min_cosine)):
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0) or math.isnan(value):
                raise ValueError(f"{flag} must be a number in [0, 1], got {value!r}")

    @property
    def gate(self) -> dict[str, float]:
        return {"min_top1_agreement": self.min_agreement, "min_cosine": self.min_cosine}

    @property
    def int8_options(self) -> PlanOptions:
        """These options with the int8 gate (what gate_plan judges an int8 plan with)."""
        return replace(self, min_agreement=self.int8_min_agreement, min_cosine=self.int8_min_cosine)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def attach_plans(model_dir: Path, manifest: Manifest, source, options: PlanOptions) -> Manifest:
    """The pipeline's one call: `manifest` with its PlanSet (the held-out inputs come from `source`)."""
    from convert.context import parity_samples

    held_out = source.sample_inputs(parity_samples(source, options.eval_samples))
    plans = build_plans(model_dir, manifest, held_out, options, source=source)
    return manifest.model_copy(update={"plans": plans})


def build_plans(model_dir: Path, manifest: Manifest, held_out: dict[str, np.ndarray], options: PlanOptions,
                *, source=None, cpu: CpuInfo | None = None) -> PlanSet:
    """Build, gate and time every plan of a converted model; return the PlanSet (the manifest is not written).
    `source` (convert.models.Source): the task metric where it has labels, and the int8 plan's calibration."""
    from convert.plan_timing import pick_default, time_plans

    cpu, evaluate = cpu or detect(), getattr(source, "evaluate", None)
    plans, skipped = ort_plans(manifest), {}
    if "openvino" in options.engines:
        if openvino_available():
            reference = run_plan(model_dir, manifest, plans["unfused"], held_out, options.threads)
            for plan in openvino_plans(manifest, cpu, options, skipped):
                plans[plan.name] = gate_plan(model_dir, manifest, plan, held_out, reference, options, evaluate)
            if options.int8 and source is not None:
                add_int8_plan(model_dir, manifest, source, options, held_out, reference, plans, skipped)
        else:
            skipped["openvino"] = "OpenVINO is not installed here (pip install openvino): ONNX Runtime plans only"
            log.warning("%s", skipped["openvino"])
    times = time_plans(model_dir, manifest, plans, held_out, options)
    default, why = pick_default(plans, times, manifest, options)
    log.info("default plan %s: %s", default, why)
    return PlanSet(cpu=cpu, plans=plans, default=default, skipped=skipped,
                   timing={"batch": options.batch, "threads": options.threads or 0, "default_reason": why})


def add_int8_plan(model_dir, manifest, source, options, held_out, reference, plans, skipped) -> None:
    from convert.ov_int8 import int8_plan

    plan, why = int8_plan(model_dir, manifest, source, options, held_out, reference, getattr(source, "evaluate", None))
    if plan is None:
        skipped["*-ov-int8"] = why
        log.warning("int8 OpenVINO plan not built: %s", why)
    else:
        plans[plan.name] = plan


def ort_plans(manifest: Manifest) -> dict[str, Plan]:
    """The variants as ONNX Runtime plans: exact fp32 ones, and int8 (lossy, its own gate) where built."""
    plans = {}
    for name in manifest.servable():
        info = manifest.variants[name]
        plans[name] = Plan(name=name, variant=name, engine="onnxruntime", precision="fp32" if info.exact else "int8",
                           exact=info.exact, servable=True)
    return plans


def openvino_plans(manifest: Manifest, cpu: CpuInfo, options: PlanOptions, skipped: dict[str, str]) -> list[Plan]:
    """Unbuilt OpenVINO plans of every servable exact variant, at the precisions asked for and run natively here."""
    precisions = ["fp32"]
    if options.precision != "fp32":
        for precision in REDUCED:
            native, why = cpu.can_run_natively(precision)
            if options.precision == precision or (options.precision == "auto" and native):
                precisions.append(precision)
            elif options.precision == "auto":
                skipped[f"*-ov-{precision}"] = why
    return [Plan(name=plan_name(v, "openvino", p), variant=v, engine="openvino", precision=p, exact=p == "fp32",
                 servable=False) for v in manifest.servable() if manifest.variants[v].exact for p in precisions]


def open_plan(model_dir: Path, manifest: Manifest, plan: Plan, threads: int | None):
    """The plan's runner (convert.plan_runner) over its own file (an int8 IR) or its variant's ONNX."""
    from convert.plan_runner import open_runner

    path = Path(model_dir) / (plan.files["openvino"] if "openvino" in plan.files
                              else manifest.variants[plan.variant].files["onnx"]).path
    return open_runner(path, plan.engine, plan.precision, threads)


def run_plan(model_dir: Path, manifest: Manifest, plan: Plan, inputs: dict[str, np.ndarray],
             threads: int | None, chunk: int = 8) -> list[np.ndarray]:
    """All outputs of the plan on `inputs`, `chunk` samples at a time, in the manifest's output order."""
    with open_plan(model_dir, manifest, plan, threads) as engine:
        return _run_all(engine, [t.name for t in manifest.outputs], inputs, chunk)


def _run_all(engine, names: list[str], inputs: dict[str, np.ndarray], chunk: int = 8) -> list[np.ndarray]:
    n = len(next(iter(inputs.values())))
    parts = [engine.infer({k: v[i:i + chunk] for k, v in inputs.items()}) for i in range(0, n, chunk)]
    return [np.concatenate([part[name] for part in parts]) for name in names]


def gate_plan(model_dir: Path, manifest: Manifest, plan: Plan, held_out: dict[str, np.ndarray],
              reference: list[np.ndarray], options: PlanOptions, evaluate=None) -> Plan:
    """fp32: exact when within FP32_REL_L2 of unfused; bf16/f16: servable when its PlanGate passes."""
    try:
        with open_plan(model_dir, manifest, plan, options.threads) as engine:
            outputs = _run_all(engine, [t.name for t in manifest.outputs], held_out)
            figures = accuracy_figures(reference, outputs)
            task = evaluate(EngineModule(engine, manifest)) if evaluate is not None and not plan.exact else {}
    except Exception as exc:  # noqa: BLE001 - an engine that cannot compile this variant: recorded, not fatal
        log.warning("plan %s could not run: %s", plan.name, exc)
        return plan.model_copy(update={"reason": f"could not run: {str(exc).splitlines()[0][:200]}"})
    if plan.exact:
        ok = figures["rel_l2"] <= FP32_REL_L2
        reason = "" if ok else f"rel-L2 {figures['rel_l2']:.2e} > {FP32_REL_L2} against unfused at fp32"
        return plan.model_copy(update={"servable": ok, "reason": reason})
    if manifest.task == "feature-extraction":  # an argmax over hidden features is no prediction: not gated
        figures["top1_agreement"] = None
    failed = judge(figures, options.gate)
    gate = PlanGate(passed=not failed, samples=len(reference[0]), rel_l2=figures["rel_l2"], cosine=figures["cosine"],
                    top1_agreement=figures["top1_agreement"], task=task, gate=options.gate, failed=failed)
    log.info("plan %s: rel-L2 %.2e, cosine %.6f, agreement %s%s", plan.name, gate.rel_l2, gate.cosine,
             gate.top1_agreement, "" if gate.passed else f"; gate failed: {failed}")
    return plan.model_copy(update={"servable": gate.passed, "gate": gate,
                                   "reason": "" if gate.passed else f"gate failed: {'; '.join(failed)}"})


class EngineModule:
    """An engine behind a torch module's call (keyword tensors -> first output), for a Source's `evaluate`."""

    def __init__(self, engine, manifest: Manifest) -> None:
        self.engine, self.first = engine, manifest.outputs[0].name

    def __call__(self, **inputs):
        import torch

        arrays = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        return torch.from_numpy(_run_all(self.engine, [self.first], arrays)[0])

    def eval(self) -> EngineModule:  # evaluate() may call model.eval()
        return self


# -- CLI (convert/cli.py adds these to `normfuse convert`) ------------------------------------------------
def add_arguments(parser) -> None:
    from convert.cli import unit_interval

    group = parser.add_argument_group("CPU plans (variant x engine x precision; docs/plans.md)")
    group.add_argument("--cpu-precision", choices=PRECISION_CHOICES, default="auto",
                       help="auto: fp32 plus every reduced precision this CPU runs natively (bf16 on AMX or "
                            "AVX512-BF16, f16 on AMX-FP16/AVX512-FP16); fp32: exact plans only")
    group.add_argument("--engines", type=engine_list, default=ENGINES, metavar="LIST",
                       help="CPU engines to build plans for (default onnxruntime,openvino; onnxruntime alone: "
                            "no plans beyond the variants)")
    group.add_argument("--plan-min-agreement", type=unit_interval, default=MIN_AGREEMENT, metavar="A",
                       help=f"reduced-precision gate: top-1 agreement with unfused (default {MIN_AGREEMENT})")
    group.add_argument("--plan-min-cosine", type=unit_interval, default=MIN_COSINE, metavar="C",
                       help=f"reduced-precision gate: cosine with unfused (default {MIN_COSINE})")


def engine_list(text: str) -> tuple[str, ...]:
    names = tuple(e.strip() for e in text.split(",") if e.strip())
    if not names or any(e not in ENGINES for e in names) or "onnxruntime" not in names:
        raise argparse.ArgumentTypeError(f"expected onnxruntime or onnxruntime,openvino; got {text!r}")
    return names


def options_from(args) -> PlanOptions | None:
    """PlanOptions from `normfuse convert`'s arguments; None when no plan beyond the variants is wanted."""
    if tuple(args.engines) == ("onnxruntime",) or getattr(args, "no_benchmark", False):
        return None
    return PlanOptions(precision=args.cpu_precision, engines=tuple(args.engines), min_agreement=args.plan_min_agreement,
                       min_cosine=args.plan_min_cosine, threads=args.threads,
                       allow_lossy_default=args.allow_lossy_default, int8=bool(args.variants and "int8" in args.variants),
                       int8_min_agreement=args.int8_min_agreement, int8_min_cosine=args.int8_min_cosine)


def summary(manifest: Manifest) -> str:
    """The plans' lines of `normfuse convert`'s summary."""
    plans = manifest.plans
    if plans is None:
        return ""
    lines = [f"plans on {plans.cpu.summary()}:"]
    for name, plan in plans.plans.items():
        ratio = next((v for k, v in plan.latency_ms.items() if k.endswith("_vs_unfused")), None)
        state = "exact" if plan.exact else ("gated" if plan.servable else "REFUSED")
        agreement = plan.gate.top1_agreement if plan.gate else None
        gate = (f"  cosine {plan.gate.cosine:.6f}" + (f", agreement {agreement:.4f}" if agreement is not None else "")
                if plan.gate else "")
        lines.append(f"  {name:<22} {plan.engine:<11} {plan.precision:<5} {state:<8}"
                     + (f" {ratio:.2f}x unfused time" if ratio else "") + gate
                     + (f"  ({plan.reason})" if plan.reason else ""))
    lines += [f"  {name:<22} not built: {why}" for name, why in plans.skipped.items()]
    lines.append(f"default plan: {plans.default}  ({plans.timing.get('default_reason', '')})")
    return "\n".join(lines) + "\n"
