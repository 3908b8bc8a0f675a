"""TensorRT for the lossy int8 variants: the QDQ ONNX *is* the precision contract.

TensorRT 11 networks are strongly typed: Q/DQ nodes in the graph make an explicitly quantized INT8 plan, with
no calibrator and no INT8 builder flag (tensorrt.md §0.1, §7.2). So `convert.tensorrt.build.build_engines` parses a
lossy variant's own ONNX (the ORT quantization tool's QDQ output) whatever `--precision` says and keys the plan
as precision "int8". Its gate is the variant's own accuracy gate, not the exact variants' parity rule: at build
time the plan runs the held-out inputs saved at conversion (`reference.npz`, with unfused's outputs) and must
meet the manifest's thresholds, or it is deleted, flagged and the variant is no longer servable (recorded in
the manifest; the benchmark-only int8-plain is only flagged and keeps its plan, which exists to be timed). `engines.tensorrt` judges it again when it opens a plan, so a plan copied in by hand is caught too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engines.manifest import Manifest, accuracy_figures, load_reference, write_manifest
from engines.trt_cache import sidecar_path

log = logging.getLogger(__name__)


def is_lossy(variant) -> bool:
    return variant.accuracy is not None


def should_build(variant) -> bool:
    """A lossy variant that failed its gate at conversion is neither served nor benchmarked: no plan."""
    return not is_lossy(variant) or variant.servable or variant.benchmark_only


def plan_precision(variant, requested: str) -> str:
    return "int8" if is_lossy(variant) else requested


def gate_plans(model_dir: Path, manifest: Manifest, plans: dict[str, Path], run_plan) -> dict[str, bool]:
    """Judge each lossy plan on its variant's saved reference with its own gate; record, delete failures."""
    passed = {}
    for name, plan in plans.items():
        info = manifest.variants[name]
        if "reference" not in info.files:
            raise RuntimeError(f"variant {name!r} has no reference.npz to gate its int8 plan; reconvert it")
        inputs, reference = load_reference(Path(model_dir) / info.files["reference"].path)
        figures = accuracy_figures(reference, run_plan(plan, inputs))
        failed = info.accuracy.judge(figures)
        log.info("TensorRT int8 %s vs unfused on %d held-out inputs: %s", name, len(reference[0]), figures)
        info.flags = [f for f in info.flags if not f.startswith("tensorrt-accuracy-failed")]
        if failed:
            info.flags.append(f"tensorrt-accuracy-failed:int8 ({'; '.join(failed)})")
        if failed and not info.benchmark_only:  # int8-plain keeps its plan: it is built to be measured
            info.servable = False
            plan.unlink(missing_ok=True)
            sidecar_path(plan).unlink(missing_ok=True)  # nothing points at a removed plan
        passed[name] = not failed or info.benchmark_only
    if plans:
        if not manifest.variants[manifest.default_variant].servable:
            manifest.default_variant = "unfused"
        write_manifest(Path(model_dir), manifest)
    return passed
