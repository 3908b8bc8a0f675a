"""TensorRT for the lossy int8 variants: the QDQ ONNX *is* the precision contract.

TensorRT 11 networks are strongly typed: Q/DQ nodes in the graph make an explicitly quantized INT8 plan, with
no calibrator and no INT8 builder flag (tensorrt.md §0.1, §7.2). So `build_tensorrt.build_engines` parses a
lossy variant's own ONNX (the ORT quantization tool's QDQ output) whatever `--precision` says and keys the plan
as precision "int8". Its accuracy gate runs where the plan can run: `engines.tensorrt` judges the plan on the
held-out inputs saved at conversion (`reference.npz`, unfused's outputs) with the variant's own thresholds when
it opens it, and refuses a plan that misses them (convert does not import the runtime; STYLE.md).
"""

from __future__ import annotations


def is_lossy(variant) -> bool:
    return variant.accuracy is not None


def should_build(variant) -> bool:
    """A lossy variant that failed its gate at conversion is neither served nor benchmarked: no plan."""
    return not is_lossy(variant) or variant.servable or variant.benchmark_only


def plan_precision(variant, requested: str) -> str:
    return "int8" if is_lossy(variant) else requested
