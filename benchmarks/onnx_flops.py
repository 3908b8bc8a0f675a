"""FLOPs of one inference of an ONNX graph, counted from its MatMul / Gemm / Conv shapes (2 per multiply-add).

The graph's dynamic input axes are fixed to the timed shapes and ONNX shape inference (with data propagation,
so HF exports' computed Reshape targets resolve) gives every matrix product's operand shapes. Element-wise ops,
norms and softmax are not counted: the figure is the matrix work, what the matrix-engine peak is a peak of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FlopCount:
    flops: int
    counted: int     # MatMul/Gemm/Conv nodes counted
    unresolved: int  # such nodes whose shapes inference could not resolve (their FLOPs are missing)

    @property
    def complete(self) -> bool:
        return self.unresolved == 0


def count_flops(path: str | Path, input_shapes: dict[str, list[int]]) -> FlopCount:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # shapes only: initializer dims are in the protos
    for tensor in model.graph.input:
        if tensor.name in input_shapes:
            dims = tensor.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[tensor.name], strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    total = counted = unresolved = 0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            unresolved += 1
        else:
            total, counted = total + flops, counted + 1
    return FlopCount(total, counted, unresolved)


def _node_flops(node, shapes: dict[str, list[int]]) -> int | None:
    a, b = (shapes.get(name) for name in node.input[:2])
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        return None if b is None or out is None else 2 * math.prod(out) * math.prod(b[1:])
    if a is None or b is None:
        return None
    if node.op_type == "Gemm":
        attrs = {x.name: x.i for x in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
        n = b[0] if attrs.get("transB") else b[1]
        return 2 * m * k * n
    return matmul_flops(a, b)


def matmul_flops(a: list[int], b: list[int]) -> int:
    """numpy.matmul semantics: 1-D operands are promoted, leading axes broadcast."""
    a2, b2 = ([1] + a if len(a) == 1 else a), (b + [1] if len(b) == 1 else b)
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch_a, batch_b = a2[:-2], b2[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a, batch_b = [1] * (width - len(batch_a)) + batch_a, [1] * (width - len(batch_b)) + batch_b
    return 2 * math.prod(max(x, y) for x, y in zip(batch_a, batch_b, strict=True)) * m * k * n
