"""FP16 precision-annotated ONNX: FP16 weights and activations, normalization statistics kept in FP32.

TensorRT 11 removed the FP16 builder flag and every per-layer precision setting: networks are strongly
typed, so precision is a property of the ONNX file (tensorrt.md §0.1, norm-fusion.md §8.3). This module
writes that file on CPU with `onnxconverter-common`'s float16 pass, and blocks from FP16:

* the normalization operators (LayerNormalization, RMSNormalization, ORT's Simplified/Skip forms,
  Group/Instance/BatchNormalization), whose statistics must not run in FP16;
* the *decomposed* normalizations' statistics, found by a small graph match: Pow(x, 2) or Mul(x, x) ->
  ReduceMean -> Add(eps) -> Sqrt -> Reciprocal/Div (and the normalizing Mul), plus the centring
  ReduceMean/Sub of a decomposed LayerNorm. In FP16 (x - mean)^2 overflows once |x - mean| > 256.

Graph inputs and outputs stay FP32 (`keep_io_types`). Weights read only by FP32 nodes keep their original
FP32 values instead of an FP16 round trip.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

NORM_OPS = (
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
)
_STAT_CHAIN = ("Add", "Sqrt", "Reciprocal")  # ReduceMean -> (+eps) -> sqrt -> 1/x


@dataclass
class Fp16Model:
    model: onnx.ModelProto
    kept_fp32: list[str]  # names of the nodes left in FP32 (normalization ops and statistics)


def statistics_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the primitive nodes that compute a decomposed norm's statistics (see module docstring)."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        square = producers.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if square is None or not _is_square(square, producers, graph):
            continue
        keep += [square, node]
        centred = producers.get(square.input[0])
        mean = producers.get(centred.input[1]) if centred is not None and centred.op_type == "Sub" else None
        if mean is not None and mean.op_type == "ReduceMean":
            keep += [centred, mean]
        keep += _forward_chain(node, consumers)
    seen: dict[str, None] = {}
    for node in keep:
        seen.setdefault(node.name)
    return list(seen)


def _forward_chain(node: onnx.NodeProto, consumers) -> list[onnx.NodeProto]:
    chain, current = [], node
    for _ in range(len(_STAT_CHAIN) + 1):
        following = consumers.get(current.output[0], [])
        if len(following) != 1:
            break
        current = following[0]
        if current.op_type in _STAT_CHAIN:
            chain.append(current)
            continue
        if current.op_type in ("Div", "Mul"):  # x / sqrt(var + eps) or x * (1 / sqrt(var + eps))
            chain.append(current)
        break
    return chain


def _is_square(node: onnx.NodeProto, producers, graph: onnx.GraphProto) -> bool:
    if node.op_type == "Mul":
        return node.input[0] == node.input[1]
    if node.op_type != "Pow":
        return False
    exponent = _constant(node.input[1], producers, graph)
    return exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0


def _constant(name: str, producers, graph: onnx.GraphProto) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is None or node.op_type != "Constant":
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(attr))
    return None


def to_fp16(model: onnx.ModelProto, *, extra_fp32_nodes: tuple[str, ...] = ()) -> Fp16Model:
    """A new FP16 model with FP32 I/O and normalization kept in FP32; `model` is left untouched."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ImportError(
            f"FP16 ONNX conversion needs onnxconverter-common ({exc}): pip install 'onnxconverter-common>=1.16'"
        ) from exc

    source = onnx.ModelProto()
    source.CopyFrom(model)
    for i, node in enumerate(source.graph.node):
        if not node.name:
            node.name = f"{node.op_type.lower()}_{i}"
    stats = statistics_nodes(source.graph)
    blocked = list(dict.fromkeys([*stats, *extra_fp32_nodes]))
    norm_nodes = [n.name for n in source.graph.node if n.op_type in NORM_OPS]
    converted = float16.convert_float_to_float16(
        source,
        keep_io_types=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *NORM_OPS],
        node_block_list=blocked,
    )
    retyped = _retype_casts(converted, {n.name for n in source.graph.node} - set(blocked))
    restored = _restore_fp32_weights(converted, source)
    onnx.checker.check_model(converted)
    log.info(
        "FP16 ONNX: %d normalization nodes and %d statistics nodes kept in FP32; %d weights kept FP32; "
        "%d casts retyped", len(norm_nodes), len(stats), restored, retyped,
    )
    return Fp16Model(converted, [*norm_nodes, *blocked])


def _retype_casts(model: onnx.ModelProto, fp16_nodes: set[str]) -> int:
    """The model's own Cast-to-FP32 nodes (e.g. a shape made float for a scale) must now produce FP16.

    onnxconverter-common retypes their outputs' value_info but leaves `to=FLOAT`, which ORT rejects."""
    count = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.name not in fp16_nodes:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
                count += 1
    return count


def _restore_fp32_weights(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Replace Cast(fp16 weight -> fp32) by the original fp32 weight, so FP32 nodes see exact values."""
    fp32_weights = {i.name: i for i in original.graph.initializer if i.data_type == TensorProto.FLOAT}
    fp16_weights = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    graph, restored = model.graph, 0
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != TensorProto.FLOAT:
            continue
        name = node.input[0]
        if name not in fp16_weights or name not in fp32_weights:
            continue
        exact = onnx.TensorProto()
        exact.CopyFrom(fp32_weights[name])
        exact.name = f"{name}_fp32"
        if exact.name not in {i.name for i in graph.initializer}:
            graph.initializer.append(exact)
        for reader in graph.node:
            for k, value in enumerate(reader.input):
                if value == node.output[0]:
                    reader.input[k] = exact.name
        graph.node.remove(node)
        restored += 1
    still_read = {value for node in graph.node for value in node.input}
    for init in [i for i in graph.initializer if i.name in fp16_weights and i.name not in still_read]:
        graph.initializer.remove(init)
    return restored


def has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer)


def write_fp16_onnx(src: Path, dst: Path) -> Fp16Model:
    """Read the FP32 contract ONNX at `src` (with external data) and write its FP16 form to `dst`.

    Weights go to ``<dst>.data`` when the source keeps its weights as external data.
    """
    src, dst = Path(src), Path(dst)
    result = to_fp16(onnx.load(str(src)))
    external = has_external_data(src)
    onnx.save(
        result.model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
        location=f"{dst.name}.data",
    )
    return result


def fp32_compute_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> elem type name of its first input, after shape inference (for reports and tests)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return {
        node.name: TensorProto.DataType.Name(types.get(node.input[0], TensorProto.UNDEFINED))
        for node in inferred.graph.node
        if node.input
    }

