"""One variant of a conversion: rewrite the source, verify it in torch, export ONNX, check it, census its ops and
gate it on ONNX Runtime against the original model's outputs. A variant that cannot be built is recorded with
the reason instead (`build_variant` returns None).
"""

from __future__ import annotations

import copy
import logging

from convert.context import Context
from convert.export import OPSET, ExportError, census, check_onnx, export_onnx, export_torch, lost_fusions
from convert.exportable import describe_export
from convert.lossy import LOSSY_VARIANTS, build_lossy
from convert.memory import release_memory
from convert.rewrites import BENCHMARK_ONLY
from engines.manifest import VariantInfo, file_ref

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "unfused": "the original model, exported as is",
    "affine": "LayerNorm/RMSNorm γ, β folded into the linear layers that read them",
    "rmsnorm": "Pre-LN -> Pre-RMSNorm: residual writers re-centred, LayerNorm replaced by RMSNorm",
    "crmsnorm": "Pre-CRMSNorm: residual stream compressed to d-1, CRMSNorm",
    "folded": "BatchNorm / Unified Normalization / PowerNorm statistics folded into neighbouring layers",
    "nonorm": "every normalization removed: the no-norm speed bound, not the same function (benchmark only)",
}


def build_variant(ctx: Context, variant: str, not_applicable: dict[str, str]) -> VariantInfo | None:
    """Rewrite, verify, export and census one variant; None (with the reason recorded) when it cannot be built."""
    from convert.models.hf import user_names
    from convert.quantize import QuantizationError
    from convert.rewrites import NotApplicable, first_line

    try:
        return (build_lossy if variant in LOSSY_VARIANTS else build_exact)(ctx, variant)
    except (NotApplicable, QuantizationError) as exc:
        log.info("variant %s does not apply: %s", variant, exc)
        not_applicable[variant] = user_names(str(exc), ctx.source.model)
    except ImportError as exc:  # the rewrite's module is not part of this installation
        log.warning("variant %s is not available: %s", variant, exc)
        not_applicable[variant] = f"rewrite not available: {exc}"
    except ExportError as exc:
        log.warning("variant %s could not be exported: %s", variant, exc)
        not_applicable[variant] = user_names(str(exc), ctx.source.model)
    except Exception as exc:
        if variant == "unfused":
            raise
        log.debug("variant %s failed", variant, exc_info=True)  # the traceback: --verbose and the log file
        log.warning("variant %s failed: %s", variant, first_line(exc))
        not_applicable[variant] = user_names(f"failed: {first_line(exc)}", ctx.source.model)
    return None


def build_exact(ctx: Context, variant: str) -> VariantInfo:
    """unfused (the source as is) or an exact rewrite of it, exported and gated against the source."""
    import torch

    from convert.rewrites import rewrite, shared_tensors
    from convert.verify import compare, run

    src, parity, flags = ctx.source, [], []
    if variant == "unfused":
        # a copy over the same tensors: tracing for export may set module attributes (HF Swin turns its window
        # size into a traced tensor), which must not leak into the source that the rewrites trace next
        model = copy.deepcopy(src.model, shared_tensors(src.model))
    else:
        ctx.weights.restore()
        try:
            # the copy shares the tensors the rewrite leaves alone; parking then swaps only the source's
            with ctx.weights.shedding():
                model = rewrite(src.model, variant, inputs=ctx.trace, share_weights=True, check=False)
        finally:
            ctx.weights.park()  # from here on only the variant's copy is in memory
    reference = "torch unfused fp32"
    if variant != "unfused":
        torch_check = compare(ctx.reference, run(model, ctx.held_out, torch.float32), dtype="float32")
        parity.append(torch_check.to_parity(reference, f"torch {variant} fp32"))
    directory = ctx.staging / variant
    exporter = describe_export(model, OPSET)  # e.g. a fused MoE's experts are exported as batched_mm
    onnx_path = export_onnx(model, ctx.example, directory / "model.onnx", inputs=src.inputs, outputs=src.outputs,
                            check=False)
    files = {"onnx": file_ref(ctx.staging, onnx_path)}
    if ctx.torch_artifacts:
        try:
            files["torch"] = file_ref(ctx.staging, export_torch(model, directory / "model.pt"))
        except ExportError as exc:
            log.warning("variant %s: no torch artifact: %s", variant, exc)
            flags.append(f"no-torch-artifact: {str(exc).splitlines()[0][:200]}")
    del model
    ctx.weights.park()  # after the unfused export the source waits for the next rewrite (no-op otherwise)
    release_memory()
    check_onnx(onnx_path)  # holds the ONNX model twice: run once the torch copy is gone
    op_census, outputs = census(onnx_path, threads=ctx.threads, inputs=ctx.held_out)
    ort_check = compare(ctx.reference, outputs, dtype="float32")
    parity.append(ort_check.to_parity(reference, f"onnxruntime cpu {variant} fp32"))
    bound = variant in BENCHMARK_ONLY
    return VariantInfo(
        name=variant, description=DESCRIPTIONS.get(variant, ""), exact=not bound, benchmark_only=bound,
        servable=not bound and all(p.passed for p in parity), files=files, parity=parity,
        op_census=op_census, flags=flags, exporter=exporter,
    )


def flag_lost_fusions(built: dict[str, VariantInfo]) -> None:
    reference = built["unfused"].op_census
    for name, info in built.items():
        if name != "unfused":
            info.flags.extend(lost_fusions(reference, info.op_census))


def unfused_failure(info, reason: str | None) -> str:
    if info is None:
        return f"the original model could not be exported: {reason}"
    failed = [p for p in info.parity if not p.passed]
    detail = "; ".join(f"{p.candidate}: rel_l2 {p.rel_l2:.3g} > gate {p.gate.get('rel_l2')}" for p in failed)
    return f"the exported original model does not match torch ({detail})"
