"""Static int8 quantization of an exported ONNX model with ONNX Runtime's quantization tool, and its accuracy.

    fp32 model.onnx -> quant_pre_process (shape inference + graph clean-up) -> quantize_static:
    QDQ format, int8 weights per output channel (symmetric), uint8 activations per tensor (asymmetric,
    MinMax ranges from calibration batches)

Only the linear layers are quantized: MatMul/Gemm nodes whose weight is an initializer (the exported
nn.Linear / Conv1D). LayerNormalization, Softmax and the attention's activation×activation MatMuls stay in
float, as do every other op. Whether that holds accuracy is what the `smoothed` reparameterization is for
(convert.rewrites.smooth); this module is the library glue and the measurement, nothing norm-specific.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.manifest import judge  # the gate, shared with engines (which judges TensorRT plans with it)

log = logging.getLogger(__name__)

LINEAR_OPS = ("MatMul", "Gemm")
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear")


class QuantizationError(RuntimeError):
    """The model could not be quantized (no linear layer, calibration failed, ...); the message says why."""


@dataclass(frozen=True)
class Int8Options:
    """How the int8 variants are calibrated and gated (CLI: --int8-*)."""

    alpha: float = 0.5  # SmoothQuant's migration strength: 0 = all on the weights' side ... 1 = all on activations'
    method: str = "smoothquant"  # or "repq" (RepQ-ViT's range-based scale)
    min_agreement: float = 0.99  # gate: top-1 (argmax) agreement with unfused on held-out data
    min_cosine: float = 0.999  # gate: cosine similarity of all outputs with unfused
    calibration_samples: int = 64  # calibration inputs (disjoint from the held-out evaluation inputs)
    eval_samples: int = 256  # held-out inputs the accuracy record is measured on (capped by output size)
    calibration_batch: int = 8
    # Post-LN norms (their output is also the residual): give their linear readers an explicit 1/s (one Mul each)
    post_ln_scale: bool = True

    def __post_init__(self) -> None:
        for flag, value in (("--int8-alpha", self.alpha), ("--int8-min-agreement", self.min_agreement),
                            ("--int8-min-cosine", self.min_cosine)):
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0) or math.isnan(value):
                raise ValueError(f"{flag} must be a number in [0, 1], got {value!r}")
        if self.method not in ("smoothquant", "repq"):
            raise ValueError(f"--int8-method must be smoothquant or repq, got {self.method!r}")
        if self.calibration_samples < 1 or self.eval_samples < 2:
            raise ValueError("--int8-calibration needs >= 1 sample and the evaluation >= 2")


def linear_nodes(model) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is a weight (an initializer): the linear layers."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in weights]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of input batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # part of the interface in recent ORT releases; one pass is all MinMax needs
        pass


def quantize_onnx(fp32: Path, out: Path, calibration: list[dict[str, np.ndarray]]) -> dict:
    """Write the QDQ int8 model of `fp32` to `out`; return what was quantized (for the manifest)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise QuantizationError("no calibration batches")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="normfuse-int8-", dir=out.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        nodes = linear_nodes(onnx.load(str(pre), load_external_data=False))
        if not nodes:
            raise QuantizationError("the model has no linear layer (MatMul/Gemm with a weight) to quantize")
        try:
            quantize_static(
                str(pre), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(LINEAR_OPS), nodes_to_quantize=nodes, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # the linear layers' outputs stay float (no Q/DQ pair before the bias Add or the residual)
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": list(LINEAR_OPS)},
            )
        except Exception as exc:  # noqa: BLE001 - the tool's own message says what failed
            raise QuantizationError(f"calibration/quantization failed: {type(exc).__name__}: {exc}") from exc
    quantized = onnx.load(str(out), load_external_data=False)
    ops = Counter(n.op_type for n in quantized.graph.node)
    if not ops.get("DequantizeLinear"):
        raise QuantizationError("ONNX Runtime's quantizer left no quantized op in the model")
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 symmetric, per output channel", "activations": "uint8 asymmetric, per tensor (MinMax)",
            "linear_layers": len(nodes), "calibration_batches": len(calibration),
            "float_ops_kept": sorted({op for op in ops if op not in QUANT_OPS and op not in LINEAR_OPS}),
            "qdq_nodes": {op: ops[op] for op in ("QuantizeLinear", "DequantizeLinear") if op in ops}}


def batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Split keyword arrays into batches of `size` rows."""
    rows = len(next(iter(arrays.values())))
    return [{k: np.ascontiguousarray(v[i:i + size]) for k, v in arrays.items()} for i in range(0, rows, size)]


def passes_gate(figures: dict, options: Int8Options) -> tuple[bool, list[str]]:
    """(passed, what failed): top-1 agreement ≥ min_agreement (when defined) and cosine ≥ min_cosine."""
    failed = judge(figures, {"min_top1_agreement": options.min_agreement, "min_cosine": options.min_cosine})
    return not failed, failed
