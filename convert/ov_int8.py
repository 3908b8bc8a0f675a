"""The int8 OpenVINO plan: a model quantized by NNCF into OpenVINO's own int8 form (an IR), gated like every
lossy artifact, never the default without --allow-lossy-default.

Two candidates are built from the same calibration inputs (disjoint from the held-out ones) and the better one
on held-out data is kept (passed its gate, then higher cosine with unfused, then top-1 agreement):

    smoothed-ov-int8:  our `smoothed` reparameterization (scales folded into the norms, convert.rewrites.smooth)
                       -> ONNX -> nncf.quantize(TRANSFORMER) with NNCF's own SmoothQuant disabled
    unfused-ov-int8:   the unfused ONNX -> nncf.quantize(TRANSFORMER) with NNCF's SmoothQuant (α 0.95 on matmuls)

NNCF's SmoothQuant inserts a Multiply before each smoothed MatMul; ours folds the same kind of scale into the
norm's γ/β, so the graph keeps its shape. The kept plan records both candidates' figures (`quantization`).
Needs `nncf` (the int8-openvino extra); without it the plan is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from engines.plans import Plan, PlanFile

log = logging.getLogger(__name__)

CANDIDATES = ("smoothed-ov-int8", "unfused-ov-int8")


def nncf_missing() -> str | None:
    if importlib.util.find_spec("nncf") is None:
        return "NNCF is not installed here (pip install 'normfuse[int8-openvino]')"
    return None


def quantize_ir(onnx: Path, out_dir: Path, calibration: list[dict[str, np.ndarray]], *, nncf_smoothquant: bool
                ) -> dict[str, PlanFile]:
    """NNCF int8 of `onnx` saved as out_dir/model.xml + .bin; return the plan's file records."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    from engines.manifest import sha256_file

    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters() if nncf_smoothquant
        else AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))  # a negative α disables SmoothQuant
    nncf.set_log_level(logging.ERROR)  # its INFO lines and progress bars would interleave with convert's output
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # rich progress bars
        quantized = nncf.quantize(ov.convert_model(str(onnx)), nncf.Dataset(calibration),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                                  advanced_parameters=advanced)
    log.debug("nncf.quantize(%s): %s", onnx.name, chatter.getvalue())
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    root = out_dir.parent
    return {role: PlanFile(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size)
            for role, p in (("openvino", xml), ("openvino_weights", xml.with_suffix(".bin")))}


def smoothed_onnx(source, calibration: dict[str, np.ndarray], out: Path) -> tuple[Path | None, dict]:
    """Our smoothed reparameterization of the source, exported to ONNX; (None, record) when no norm smooths."""
    import torch

    from convert.context import shorter
    from convert.export import export_onnx
    from convert.lossy import smoothed_model
    from convert.quantize import Int8Options

    weights = SimpleNamespace(restore=lambda: None, park=lambda: None, shedding=_nothing)
    trace = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in source.sample_inputs(2).items()}
    ctx = SimpleNamespace(source=source, trace=trace, weights=weights)
    model, record = smoothed_model(ctx, calibration, Int8Options())
    if model is None:
        return None, record
    example = shorter(source.sample_inputs(2), source.inputs)
    return export_onnx(model, example, out, inputs=source.inputs, outputs=source.outputs, check=False), record


class _nothing:  # noqa: N801 - stands in for ParkedWeights.shedding(): a context manager doing nothing
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def int8_plan(model_dir: Path, manifest, source, options, held_out, reference, evaluate) -> tuple[Plan | None, str]:
    """The better of the two int8 candidates, gated (convert.plans.gate_plan); (None, why) when none was built."""
    from convert.lossy import evaluation_split
    from convert.plans import gate_plan
    from convert.quantize import Int8Options, batches

    if why := nncf_missing():
        return None, why
    calibration = evaluation_split(source, Int8Options())[1]
    calibration_batches = batches(calibration, 8)
    unfused = Path(model_dir) / manifest.variants["unfused"].files["onnx"].path
    built, records = {}, {}
    with tempfile.TemporaryDirectory(prefix=".ov-int8-", dir=model_dir) as tmp:
        onnx, smoothing = smoothed_onnx(source, calibration, Path(tmp) / "smoothed.onnx")
        sources = {"unfused-ov-int8": (unfused, True)} | ({"smoothed-ov-int8": (onnx, False)} if onnx else {})
        for name, (path, nncf_sq) in sources.items():
            try:
                files = quantize_ir(path, Path(model_dir) / name, calibration_batches, nncf_smoothquant=nncf_sq)
            except Exception as exc:  # noqa: BLE001 - NNCF's own message says what failed; the other may work
                log.warning("int8 plan %s could not be built: %s", name, exc)
                records[name] = {"error": str(exc).splitlines()[0][:200]}
                continue
            plan = Plan(name=name, variant="unfused", engine="openvino", precision="int8", exact=False,
                        servable=False, files=files)
            built[name] = gate_plan(model_dir, manifest, plan, held_out, reference, options.int8_options, evaluate)
            gate = built[name].gate
            records[name] = gate.model_dump(include={"rel_l2", "cosine", "top1_agreement", "task", "passed"}) \
                if gate else {"error": built[name].reason}
    if not built:
        return None, f"no int8 candidate could be built: {records}"
    best = max(built.values(), key=_rank)
    for name in built:
        if name != best.name:
            shutil.rmtree(Path(model_dir) / name, ignore_errors=True)
    quantization = {"tool": "nncf.quantize (ModelType.TRANSFORMER)", "candidates": records,
                    "kept": best.name, "calibration_samples": len(next(iter(calibration.values()))),
                    "smoothing": smoothing if best.name == "smoothed-ov-int8" else "NNCF SmoothQuant"}
    log.info("int8 OpenVINO plan: kept %s of %s", best.name, records)
    return best.model_copy(update={"quantization": quantization}), ""


def _rank(plan: Plan) -> tuple[bool, float, float]:
    """Passed first, then cosine over all outputs (continuous: on a few hundred held-out samples one flipped argmax
    moves agreement by 0.4%, noise next to the error itself), then agreement."""
    gate = plan.gate
    if gate is None:
        return (False, -1.0, -1.0)
    return (gate.passed, gate.cosine, gate.top1_agreement if gate.top1_agreement is not None else 1.0)
