"""Fold every eval-mode BatchNorm into its linear neighbour, found on the torch.export graph of the model.

Post position — Conv/ConvTranspose/Linear → BN — folds into the producer, always exactly. Pre position
— BN → Conv/Linear — folds into the consumer, exact only when the conv reads no zero padding (a padded
zero was BN's shift c before the fold and is 0 after it; reflect/replicate/circular padding copies real
values and stays exact). Every BatchNorm must fold, or the pass refuses with the layer and the reason
before touching anything. The graph is the rewrites' one front-end (`analysis.trace`, with shapes, so
Linear ↔ BatchNorm1d is checked on real ranks); the math lives in `bn_math`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from convert.rewrites import NotApplicable
from convert.rewrites.analysis import trace
from convert.rewrites.bn_math import bn_affine, fold_affine_into_consumer, fold_affine_into_producer
from convert.rewrites.graph import Graph
from convert.rewrites.graph_ops import _conv_form, _is_conv, _ndim, _paths

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
_CONSUMERS = (*_CONV, nn.Linear)  # a transposed conv spreads a constant unevenly over its output
_BATCH_NORM = torch.ops.aten.batch_norm.default


@dataclass(frozen=True)
class _Fold:
    bn: str  # qualified name of the BatchNorm
    layer: str  # qualified name of the Conv/Linear that absorbs it
    position: str  # "post": layer → BN; "pre": BN → layer


def fold_batchnorms(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Fold every BatchNorm of `model` into its neighbour, in place; return the folded BNs' names.

    `inputs`: keyword inputs to trace the model with (default: its example inputs). Raises NotApplicable
    naming the first BatchNorm that cannot be folded exactly, and leaves `model` untouched in that case.
    A model without BatchNorm returns [] without being traced.
    """
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not bns:
        return []
    for name, bn in bns.items():
        _check_statistics_fixed(name, bn)
    plan = _plan(model, bns, trace(model, inputs))
    modules = dict(model.named_modules())
    for fold in plan:
        _apply(fold, bns[fold.bn], modules[fold.layer])
        _replace_module(model, fold.bn, nn.Identity())
        logger.debug("folded %s into %s (%s)", fold.bn, fold.layer, fold.position)
    unused = sorted(set(bns) - {fold.bn for fold in plan})
    if unused:
        # never called in the traced graph: unused, so there is nothing to fold
        logger.info("left BatchNorm layers that forward() never calls: %s", ", ".join(unused))
    return [fold.bn for fold in plan]


def _check_statistics_fixed(name: str, bn: _BatchNorm) -> None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise NotApplicable(
            f"BatchNorm {name!r} has track_running_stats=False: it normalizes with batch statistics, "
            "which are not fixed at inference"
        )
    if bn.training:
        raise NotApplicable(
            f"BatchNorm {name!r} is in training mode: its statistics are not fixed; call model.eval() first"
        )


def _plan(model: nn.Module, bns: dict[str, _BatchNorm], graph: Graph) -> list[_Fold]:
    """Where each called BatchNorm folds; NotApplicable for the first one that cannot."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.target == _BATCH_NORM and _paths(node) and _paths(node)[-1] in bns:
            calls.setdefault(_paths(node)[-1], []).append(node)
    shared = _shared_parameter_owners(model)
    plan = []
    for name in bns:
        nodes = calls.get(name, [])
        if len(nodes) > 1:
            raise NotApplicable(
                f"BatchNorm {name!r} is called {len(nodes)} times; folding it would need one copy per call"
            )
        if nodes:
            plan.append(_place(model, graph, name, nodes[0], shared))
    return plan


def _place(model: nn.Module, graph: Graph, name: str, node: fx.Node, shared: set[str]) -> _Fold:
    """Fold into the producer when that is safe, else into the consumer, else refuse with the reason."""
    bn = model.get_submodule(name)
    producer = node.args[0]
    post_reason = _post_blocker(model, graph, bn, node, producer, shared)
    if post_reason is None:
        return _Fold(name, _layer(model, graph, producer, _PRODUCERS), "post")
    consumer, read = (next(iter(node.users)) if len(node.users) == 1 else None), node
    if consumer is not None and _copies_values(consumer) and len(consumer.users) == 1:
        read, consumer = consumer, next(iter(consumer.users))  # a conv's reflect/replicate/circular padding
    pre_reason = _pre_blocker(model, graph, bn, read, consumer, shared)
    if pre_reason is None:
        return _Fold(name, _layer(model, graph, consumer, _CONSUMERS), "pre")
    raise NotApplicable(f"BatchNorm {name!r} cannot be folded: {post_reason}; and {pre_reason}")


def _layer(model: nn.Module, graph: Graph, node: object, kinds: tuple[type, ...]) -> str | None:
    """The name of the torch Conv/Linear module whose `weight` this conv/linear node reads, else None."""
    if not isinstance(node, fx.Node) or not (_is_conv(node) or node.target == torch.ops.aten.linear.default):
        return None
    weight = node.args[1]
    if not graph._is_weight(weight):
        return None
    module, attr = graph._owner(node, weight)
    return module if attr == "weight" and isinstance(model.get_submodule(module), kinds) else None


def _post_blocker(model: nn.Module, graph: Graph, bn: _BatchNorm, node: fx.Node, producer: object,
                  shared: set[str]) -> str | None:
    """Why `bn` cannot fold into the layer that produces its input (None when it can)."""
    name = _layer(model, graph, producer, _PRODUCERS)
    if name is None:
        return "its input is not produced by a Conv, ConvTranspose or Linear"
    layer = model.get_submodule(name)
    if len(producer.users) > 1:
        readers = ", ".join(str(user) for user in producer.users)
        return f"its producer {name!r} has a second consumer ({readers})"
    if why := _used_elsewhere("producer", name, producer, shared):
        return why
    if _out_channels(layer) != bn.num_features or (isinstance(layer, nn.Linear) and _ndim(producer) != 2):
        channels = _out_channels(layer)
        return f"its producer {name!r} has {channels} channels on axis -1, the BatchNorm {bn.num_features} on axis 1"
    return None


def _pre_blocker(model: nn.Module, graph: Graph, bn: _BatchNorm, node: fx.Node, consumer: fx.Node | None,
                 shared: set[str]) -> str | None:
    """Why `bn` cannot fold into the layer that reads its output (None when it can)."""
    if consumer is None:
        return f"its output has {len(node.users)} readers, not one Conv or Linear"
    name = _layer(model, graph, consumer, _CONSUMERS)
    if name is None or consumer.args[0] is not node or _conv_form(consumer)[0]:
        return f"its output is read by {graph._where(consumer)} through {consumer.target}, not by a Conv or Linear"
    layer = model.get_submodule(name)
    if isinstance(layer, _CONV) and _zero_padded(layer):
        return (
            f"its consumer {name!r} zero-pads its input (padding={layer.padding}), so folding "
            "would change the border outputs"
        )
    if why := _used_elsewhere("consumer", name, consumer, shared):
        return why
    if _in_channels(layer) != bn.num_features or (isinstance(layer, nn.Linear) and _ndim(node) != 2):
        channels = _in_channels(layer)
        return f"its consumer {name!r} reads {channels} channels, the BatchNorm has {bn.num_features}"
    return None


def _used_elsewhere(role: str, name: str, call: fx.Node, shared: set[str]) -> str | None:
    """Why the layer `call` runs cannot take the fold because its weights serve more than this call: another layer
    shares them, or the layer runs twice (its weight is read by another call). None when this call is the only one."""
    if name in shared:
        return f"its {role} {name!r} shares parameters with another layer"
    if len(call.args[1].users) > 1:
        return f"its {role} {name!r} is called more than once"
    return None


def _copies_values(node: fx.Node) -> bool:
    """A padding that copies real values (reflect, replicate, circular): a per-channel affine commutes with it."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    return node.target == torch.ops.aten.pad.default and mode in ("reflect", "replicate", "circular")


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _zero_padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular pad with copies of real (BN-output) values
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return any(p > 0 for p in conv.padding)


def _shared_parameter_owners(model: nn.Module) -> set[str]:
    """Qualified names of modules holding a parameter that another module also holds (tied weights)."""
    owners: dict[int, set[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(module_name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def _apply(fold: _Fold, bn: _BatchNorm, layer: nn.Module) -> None:
    scale, shift = bn_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    groups = getattr(layer, "groups", 1)  # Linear has none
    if fold.position == "post":
        transposed = isinstance(layer, _CONV_TRANSPOSE)
        new_weight, new_bias = fold_affine_into_producer(
            weight, bias, scale, shift, transposed=transposed, groups=groups
        )
    else:
        new_weight, new_bias = fold_affine_into_consumer(weight, bias, scale, shift, groups=groups)
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight, requires_grad=requires_grad)
    layer.bias = nn.Parameter(new_bias, requires_grad=requires_grad)


def _replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
