"""Helpers over the torch.export (ATen) graph shared by the rewrites' planners: which ops pass the hidden axis
through, where an axis lands after a reshape/transpose/broadcast, what a convolution node is.

Pure functions of `torch.fx` nodes and their `meta["val"]` shapes; nothing here knows a model.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
# ops that move data without mixing values along the hidden axis (the axis is re-derived from shapes)
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
             aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
             aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.lift_fresh_copy.default}
_ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default}


def _grouped_mm_ops() -> tuple:
    """Grouped (per-expert) matmuls: torch's `_grouped_mm`, and transformers' CPU fallback when registered."""
    ops = [aten._grouped_mm.default] if hasattr(aten, "_grouped_mm") else []
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return (*ops, fallback.default) if fallback is not None else tuple(ops)


def _grouped_weight(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(W, transposed) when `node` is a grouped matmul x @ W[e] of fused experts: W [E, in, out] read as it
    is (transposed True), or x @ W[e].T with W [E, out, in] (the transpose of its last two axes read by
    nothing else). None for any other node."""
    if node.target not in _grouped_mm_ops() or not isinstance(_arg(node, 1), fx.Node):
        return None
    w = node.args[1]
    swapped = w.target == aten.transpose.int and {a % 3 for a in w.args[1:3]} == {1, 2} and _ndim(w) == 3
    if swapped and len(w.users) == 1 and isinstance(w.args[0], fx.Node):
        return w.args[0], False
    return (w, True) if _ndim(w) == 3 else None


def _batched_weight(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(W, x, transposed) when `node` is a batched matmul of per-row expert weights W[ids] (gathered along the
    experts axis, read by nothing else) and x: bmm(W[ids], x) with W [E, out, in] and x [S, in, 1], or
    bmm(x, W[ids]) with x [S, 1, in] and W [E, in, out] (transposed True). None for any other node."""
    if node.target != aten.bmm.default:
        return None
    for gathered, x, transposed in ((node.args[0], node.args[1], False), (node.args[1], node.args[0], True)):
        if isinstance(gathered, fx.Node) and gathered.target == aten.index.Tensor and len(gathered.users) == 1 \
                and _gathered_axis(gathered) == 0 and isinstance(gathered.args[0], fx.Node) \
                and _ndim(gathered.args[0]) == 3:
            return gathered.args[0], x, transposed
    return None


def _feature_axis(node: fx.Node, tensor: fx.Node) -> int:
    """The axis of `tensor` (a linear op `node`'s input or output) holding the features: the last one, except
    for a bmm(W[ids], x) of gathered expert weights, whose x [S, in, 1] and output [S, out, 1] hold them on 1."""
    batched = _batched_weight(node)
    return 1 if batched is not None and not batched[2] else _ndim(tensor) - 1


def _last_of_sum(node: fx.Node) -> fx.Node:
    while (node.target in _ADDS or _passes_through(node)) and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """W when `node` is matmul(x, W.T) for a 2-D W (its transpose used by nothing else)."""
    if node.target != aten.matmul.default or not isinstance(node.args[1], fx.Node):
        return None
    t = node.args[1]
    swapped = t.target in (aten.t.default, aten.numpy_T.default) or (t.target == aten.transpose.int and {a % 2 for a in t.args[1:3]} == {0, 1}) \
        or (t.target == aten.permute.default and list(t.args[1]) == [1, 0])
    if not swapped or len(t.users) != 1 or not isinstance(t.args[0], fx.Node) or _ndim(t.args[0]) != 2:
        return None
    return t.args[0]


def _weight_arg(node: fx.Node) -> fx.Node:
    if _transposed_weight(node) is not None:
        return _transposed_weight(node)
    if _grouped_weight(node) is not None:
        return _grouped_weight(node)[0]
    if _batched_weight(node) is not None:
        return _batched_weight(node)[0]
    return node.args[{aten.embedding.default: 0, aten.addmm.default: 2}.get(node.target, 1)]


def _paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _arg(node: fx.Node, index: int):
    return node.args[index] if len(node.args) > index else None


def _op(node: fx.Node) -> str:
    return "the model output" if node.op == "output" else getattr(node.target, "__name__", str(node.target))


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _ndim(node: fx.Node) -> int:
    return len(_shape(node))


_CONV_TRANSPOSE = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def _is_conv(node: fx.Node) -> bool:
    return node.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                           *_CONV_TRANSPOSE)


def _conv_form(node: fx.Node) -> tuple[bool, int, bool]:
    """(transposed, groups, zero-padded) of a convolution node (False, 1, False for other writers)."""
    if node.target == aten.convolution.default:
        padding, transposed, groups = node.args[4], bool(node.args[6]), int(node.args[8])
    elif node.target in _CONV_TRANSPOSE:
        padding, transposed, groups = _arg(node, 4) or 0, True, int(_arg(node, 6) or 1)
    elif _is_conv(node):
        padding, transposed, groups = _arg(node, 4) or 0, False, int(_arg(node, 6) or 1)
    else:
        return False, 1, False
    padded = padding != "valid" and (any(int(p) for p in padding) if isinstance(padding, list | tuple)
                                     else padding == "same" or bool(padding))
    return transposed, groups, padded


def _is_writer_op(node: fx.Node) -> bool:
    return node.target == aten.embedding.default or _is_conv(node)


def _passes_through(node: fx.Node) -> bool:
    if node.target == aten.dropout.default:
        return not node.args[2]  # dropout in eval mode
    if node.target == aten.index.Tensor:  # rows gathered along one other axis (MoE dispatch, token order)
        return _gathered_axis(node) is not None
    if node.target == aten.repeat_interleave.self_int:  # rows repeated along one axis (a token per top-k slot)
        return _arg(node, 2) is not None
    return node.target in _RESHAPES | _IDENTITY or node.target in (
        aten.transpose.int, aten.permute.default, aten.t.default, aten.select.int, aten.slice.Tensor,
        aten.expand.default)


def _gathered_axis(node: fx.Node) -> int | None:
    """The one axis an `index.Tensor` node gathers along with a 1-D index (x[idx], x[:, idx]), else None."""
    indices = list(node.args[1]) if len(node.args) > 1 else []
    given = [i for i, index in enumerate(indices) if index is not None]
    if len(given) != 1 or not isinstance(indices[given[0]], fx.Node) or _ndim(indices[given[0]]) != 1:
        return None
    return given[0]


def _forward_axis(node: fx.Node, source: fx.Node, axis: int) -> int | None:
    """Where the hidden axis `axis` of `source` lands in `node`'s output (None: mixed or dropped)."""
    if not _passes_through(node) or node.args[0] is not source:
        return None
    ins, outs = _shape(source), _shape(node)
    if node.target in _IDENTITY or node.target == aten.dropout.default:
        return axis
    if node.target in (aten.transpose.int, aten.permute.default, aten.t.default):
        order = list(range(len(ins)))
        if node.target == aten.permute.default:
            order = [d % len(ins) for d in node.args[1]]
        else:
            a, b = (node.args[1] % len(ins), node.args[2] % len(ins)) if node.target == aten.transpose.int else (0, 1)
            order[a], order[b] = order[b], order[a]
        return order.index(axis)
    if node.target in (aten.select.int, aten.slice.Tensor):
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(ins)
        if dim == axis:
            return None
        return axis - 1 if node.target == aten.select.int and dim < axis else axis
    if node.target == aten.index.Tensor:  # a 1-D gather keeps every other axis where it was
        return None if _gathered_axis(node) == axis else axis
    if node.target == aten.repeat_interleave.self_int:
        return None if node.args[2] % len(ins) == axis else axis
    if node.target == aten.expand.default:
        out_axis = axis + len(outs) - len(ins)
        return out_axis if outs[out_axis] == ins[axis] else None
    return _reshape_axis(ins, outs, axis)


def _reshape_axis(ins: tuple[int, ...], outs: tuple[int, ...], axis: int) -> int | None:
    """A reshape keeps an axis when the same-sized axis starts at the same flat offset."""
    before = _prod(ins[:axis])
    for out_axis in range(len(outs)):
        if _prod(outs[:out_axis]) == before and outs[out_axis] == ins[axis]:
            return out_axis
    return None


def _backward_axis(node: fx.Node, source: fx.Node, axis: int) -> int | None:
    for source_axis in range(_ndim(source)):
        if _forward_axis(node, source, source_axis) == axis:
            return source_axis
    return None


def _broadcast_axis(node: fx.Node, operand: fx.Node, axis: int) -> int | None:
    operand_axis = axis - (_ndim(node) - _ndim(operand))
    if operand_axis < 0 or _shape(operand)[operand_axis] != _shape(node)[axis]:
        return None
    return operand_axis


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result
