"""Serving a manifest's plans on this machine: which OpenVINO plans become versions, which is the default.

    manifest (as converted) --served_manifest(manifest, cpu)--> the manifest the server serves:
      variants + every servable OpenVINO plan this CPU runs natively (as a version named after the plan),
      default_variant = engines.plans.choose_servable(manifest, cpu).plan, the choice and its reason in
      plans.served

The rest of the service then serves a plan like any variant (versions, index, metadata, config, metrics,
shadow comparison with `unfused`). A plan this CPU cannot run natively (bf16 without AMX/AVX512-BF16, or any
OpenVINO plan where OpenVINO is not installed) is not loaded: it is listed in the repository index as
UNAVAILABLE with the reason (`refused_rows`), logged once per load, and the other versions are served.
"""

from __future__ import annotations

import importlib.util
import logging

from engines.cpu import CpuInfo, detect
from engines.manifest import Accuracy, FileRef, Manifest, VariantInfo
from engines.plans import Plan, choose_servable, find_plan

log = logging.getLogger(__name__)


def refused(manifest: Manifest, cpu: CpuInfo | None = None) -> dict[str, str]:
    """Servable OpenVINO plans this machine does not load, with the reason."""
    if manifest.plans is None:
        return {}
    if manifest.plans.served is not None:  # decided at load (served_manifest), the OpenVINO check included
        return dict(manifest.plans.served.refused)
    reasons = dict(choose_servable(manifest, cpu or detect()).refused)
    if importlib.util.find_spec("openvino") is None:
        reasons |= {n: "OpenVINO is not installed here (pip install openvino)" for n in manifest.plans.servable()
                    if manifest.plans.plans[n].engine == "openvino"}
    return reasons


def served_manifest(manifest: Manifest, cpu: CpuInfo | None = None, *, only_default: bool = False) -> Manifest:
    """The manifest with its runnable OpenVINO plans as versions (`only_default`: just the default plan, when it
    is one) and the default chosen for this CPU (logged); a manifest without plans is returned as it is."""
    if manifest.plans is None:
        return manifest
    cpu = cpu or detect()
    choice = choose_servable(manifest, cpu)
    skip = refused(manifest, cpu)
    if choice.plan in skip:  # OpenVINO missing: the fastest ONNX Runtime plan
        choice = choice.model_copy(update={"plan": manifest.default_variant,
                                           "reason": f"{choice.reason}; {skip[choice.plan]}: the default variant"})
    for name, why in skip.items():
        log.warning("model %s: plan %s not loaded: %s", manifest.name, name, why)
    log.info("model %s: serving plan %s by default: %s", manifest.name, choice.plan, choice.reason)
    variants = dict(manifest.variants)
    for name in manifest.plans.servable():
        plan = manifest.plans.plans[name]
        if plan.engine != "onnxruntime" and name not in skip and (name == choice.plan or not only_default):
            variants[name] = as_variant(manifest, plan)
    plans = manifest.plans.model_copy(update={"served": choice.model_copy(update={"refused": skip})})
    return manifest.model_copy(update={"variants": variants, "default_variant": choice.plan, "plans": plans})


def as_variant(manifest: Manifest, plan: Plan) -> VariantInfo:
    """A plan as the service sees a version: its variant's files and parity, the plan's exactness and gate."""
    base = manifest.variants[plan.variant]
    accuracy = Accuracy(**plan.gate.model_dump()) if plan.gate is not None else None
    files = {role: FileRef(**ref.model_dump()) for role, ref in plan.files.items()} or base.files  # int8: its IR
    return base.model_copy(update={
        "name": plan.name, "exact": plan.exact, "accuracy": accuracy, "latency_ms": plan.latency_ms, "files": files,
        "description": f"{plan.variant} on {plan.engine} {plan.precision}"
                       + ("" if plan.exact else " (reduced precision, gated)"),
    })


def plan_options(settings) -> dict:
    """The OpenVINO engine's options from the server's settings (engines.openvino.open_variant)."""
    options: dict = {"intra_op_threads": settings.intra_op_threads or None}
    options.update(streams=settings.openvino_streams or None, hint=settings.openvino_hint,
                   cache_dir=settings.openvino_cache_dir)
    return options


def engine_and_options(manifest: Manifest, version: str, settings, default_options: dict) -> tuple[str, dict]:
    """(backend, options) to open `version` with: OpenVINO's for a plan, the server's backend otherwise."""
    if find_plan(manifest, version) is not None:
        return "openvino", plan_options(settings)
    return settings.backend, default_options


def parameters(manifest: Manifest, version: str) -> dict:
    """Metadata parameters of a version: engine, precision, and for the default the reason it was chosen."""
    if manifest.plans is None:
        return {}
    plan = manifest.plans.plans.get(version)
    out = {"engine": plan.engine, "precision": plan.precision} if plan is not None else {}
    served = manifest.plans.served
    if served is not None and version == served.plan:
        out["default_reason"] = served.reason
    return out


def refused_rows(name: str, manifest: Manifest | None) -> list[dict]:
    """Repository-index rows of the plans this machine does not load (Triton's UNAVAILABLE, with the reason)."""
    if manifest is None or manifest.plans is None:
        return []
    return [{"name": name, "version": v, "state": "UNAVAILABLE", "reason": why} for v, why in refused(manifest).items()]
