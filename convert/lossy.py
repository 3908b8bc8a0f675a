"""The lossy variants, built only when asked for (`--variants ...,int8,int8-plain`), each with its accuracy record.

    int8:        source -> `smoothed` (exact; checked against unfused in torch) -> ONNX -> static QDQ int8
    int8-plain:  the unfused ONNX -> the same quantization (built to measure what smoothing buys; never served)

Both are measured against `unfused` (its ONNX Runtime session) on held-out inputs that calibration never saw:
rel-L2, cosine, top-1 agreement, and the task metric where the source has labels. `int8` is servable only when
it passes the gate (Int8Options.min_agreement / min_cosine); a variant that fails is recorded with its figures.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from convert.context import Context, parity_samples
from convert.export import census, export_onnx, ort_session, run_onnx
from convert.quantize import Int8Options, batches, passes_gate, quantize_onnx
from engines.manifest import Accuracy, Parity, VariantInfo, accuracy_figures, file_ref, save_reference

log = logging.getLogger(__name__)

LOSSY_VARIANTS = ("int8", "int8-plain")
DESCRIPTIONS = {
    "int8": "smoothed (per-channel scales moved from the norms into their linear readers), then static int8 "
            "QDQ: int8 per-channel weights, uint8 per-tensor activations, norms and softmax in float (lossy, gated)",
    "int8-plain": "the same int8 quantization of the unfused model, without smoothing (benchmark only)",
}


def build_lossy(ctx: Context, variant: str) -> VariantInfo:
    """Build, measure and gate one lossy variant in ctx.staging/<variant>/."""
    options = ctx.int8 or Int8Options()
    src, unfused = ctx.source, ctx.staging / "unfused" / "model.onnx"
    held_out, calibration = evaluation_split(src, options)
    target = ctx.staging / variant / "model.onnx"
    parity, smoothing = [], None
    with tempfile.TemporaryDirectory(prefix=f".{variant}-", dir=ctx.staging) as tmp:
        fp32 = unfused
        if variant == "int8":
            model, smoothing = smoothed_model(ctx, calibration, options)
            if model is not None:
                parity.append(smoothing_parity(ctx, model))
                fp32 = export_onnx(model, ctx.example, Path(tmp) / "smoothed.onnx", inputs=src.inputs,
                                   outputs=src.outputs, check=False)
                del model
            ctx.weights.park()
        quantization = quantize_onnx(fp32, target, batches(calibration, options.calibration_batch))
    reference = run_onnx(ort_session(unfused, threads=ctx.threads), held_out)
    op_census, outputs = census(target, threads=ctx.threads, inputs=held_out)
    accuracy = accuracy_record(src, reference, outputs, unfused, target, options, ctx.threads)
    accuracy.quantization, accuracy.smoothing = quantization, smoothing
    accuracy.calibration = {"samples": len(next(iter(calibration.values()))), "batch": options.calibration_batch,
                            "source": "calibration_inputs" if src.calibration_inputs
                            else "sample_inputs beyond the held-out ones"}
    reference_file = save_reference(target.with_name("reference.npz"),
                                    {k: v[:REFERENCE_SAMPLES] for k, v in held_out.items()},
                                    [o[:REFERENCE_SAMPLES] for o in reference])
    log.info("%s: %s", variant, "passed its gate" if accuracy.passed else f"failed its gate: {accuracy.failed}")
    bound = variant == "int8-plain"
    return VariantInfo(
        name=variant, description=DESCRIPTIONS[variant], exact=False, benchmark_only=bound,
        servable=not bound and accuracy.passed and all(p.passed for p in parity),
        files={"onnx": file_ref(ctx.staging, target), "reference": file_ref(ctx.staging, reference_file)},
        parity=parity, op_census=op_census, accuracy=accuracy,
        flags=[] if accuracy.passed else [f"accuracy-gate-failed: {'; '.join(accuracy.failed)}"],
    )


REFERENCE_SAMPLES = 32  # held-out inputs + unfused outputs kept beside the int8 ONNX to gate TensorRT plans


def evaluation_split(src, options: Int8Options) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(held-out inputs, calibration inputs), disjoint: calibration from the source's own calibration set, or
    the sample inputs after the held-out ones."""
    n = parity_samples(src, options.eval_samples)
    held_out = src.sample_inputs(n)
    if src.calibration_inputs is not None:
        return held_out, src.calibration_inputs(options.calibration_samples)
    more = src.sample_inputs(n + options.calibration_samples)
    return held_out, {k: v[n:] for k, v in more.items()}


def smoothed_model(ctx, calibration: dict[str, np.ndarray], options: Int8Options):
    """(the smoothed copy of the source, the smoothing record); (None, record) when no norm can be smoothed."""
    from convert.rewrites import NotApplicable, shared_tensors
    from convert.rewrites.smooth import smooth

    torch_batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches(calibration, options.calibration_batch)]
    ctx.weights.restore()
    try:
        with ctx.weights.shedding():
            model = copy.deepcopy(ctx.source.model, shared_tensors(ctx.source.model))
            model = smooth(model, ctx.trace, calibration=torch_batches, alpha=options.alpha, method=options.method,
                           post_ln_scale=options.post_ln_scale)
    except NotApplicable as exc:
        log.warning("int8: no norm smoothed (%s); quantizing the model as it is", exc)
        return None, {"method": options.method, "alpha": options.alpha, "applied": {},
                      "skipped": skipped_norms(ctx) or {"*": str(exc)}}
    return model.eval(), model.normfuse_smoothing.as_dict()


def skipped_norms(ctx) -> dict[str, str]:
    """Every norm with the reason it could not be smoothed (for the manifest, when none could)."""
    from convert.rewrites import NotApplicable
    from convert.rewrites.smooth import smoothable_norms

    try:
        return smoothable_norms(ctx.source.model, ctx.trace, post_ln=True)[2]
    except NotApplicable:
        return {}


def smoothing_parity(ctx, model) -> Parity:
    """The reparameterization is exact: the smoothed torch model against the original's outputs (fp32 gate)."""
    from convert.verify import compare, run

    check = compare(ctx.reference, run(model, ctx.held_out, torch.float32), dtype="float32")
    return check.to_parity("torch unfused fp32", "torch smoothed fp32 (before quantization)")


def accuracy_record(src, reference, outputs, unfused: Path, target: Path, options: Int8Options,
                    threads: int | None) -> Accuracy:
    figures = accuracy_figures(reference, outputs)
    if src.task == "feature-extraction":  # an argmax over hidden features is no prediction: not gated
        figures["top1_agreement"] = None
    passed, failed = passes_gate(figures, options)
    task = {}
    if src.evaluate is not None:
        task = {f"unfused_{k}": v for k, v in src.evaluate(OrtModule(unfused, threads)).items()}
        task |= src.evaluate(OrtModule(target, threads))
    return Accuracy(
        passed=passed, reference="onnxruntime cpu unfused fp32", samples=int(len(reference[0])),
        rel_l2=figures["rel_l2"], cosine=figures["cosine"], top1_agreement=figures["top1_agreement"], task=task,
        gate={"min_top1_agreement": options.min_agreement, "min_cosine": options.min_cosine}, failed=failed,
    )


class OrtModule(torch.nn.Module):
    """An ONNX file behind a torch module's call (keyword inputs -> first output), for a Source's `evaluate`."""

    def __init__(self, path: Path, threads: int | None) -> None:
        super().__init__()
        self.session = ort_session(path, threads=threads)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        arrays = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        return torch.from_numpy(run_onnx(self.session, arrays)[0])
