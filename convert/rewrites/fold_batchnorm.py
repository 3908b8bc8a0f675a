"""Fold every eval-mode BatchNorm into its linear neighbour, found on a torch.fx graph of the model.

Post position — Conv/ConvTranspose/Linear → BN — folds into the producer, always exactly. Pre position
— BN → Conv/Linear — folds into the consumer, exact only when the conv reads no zero padding (a padded
zero was BN's shift c before the fold and is 0 after it; reflect/replicate/circular padding copies real
values and stays exact). Every BatchNorm must fold, or the pass refuses with the layer and the reason
before touching anything. The math lives in `bn_math`; this module only decides where it is safe.

Limit: fx graphs carry no shapes, so Linear ↔ BatchNorm1d assumes [batch, features] tensors (BN1d's
channels are axis 1, Linear's features the last axis); the channel counts are checked, the rank is not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from convert.rewrites import NotApplicable
from convert.rewrites.bn_math import bn_affine, fold_affine_into_consumer, fold_affine_into_producer

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
_CONSUMERS = (*_CONV, nn.Linear)  # a transposed conv spreads a constant unevenly over its output
_Modules = dict[str, nn.Module]  # qualified name -> module
_Calls = dict[str, list[fx.Node]]  # module name -> the graph nodes calling it


@dataclass(frozen=True)
class _Fold:
    bn: str  # qualified name of the BatchNorm
    layer: str  # qualified name of the Conv/Linear that absorbs it
    position: str  # "post": layer → BN; "pre": BN → layer


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every BatchNorm of `model` into its neighbour, in place; return the folded BNs' names.

    Raises NotApplicable naming the first BatchNorm that cannot be folded exactly, and leaves `model`
    untouched in that case. A model without BatchNorm returns [] without being traced.
    """
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not bns:
        return []
    for name, bn in bns.items():
        _check_statistics_fixed(name, bn)
    plan = _plan(model, bns)
    modules = dict(model.named_modules())
    for fold in plan:
        _apply(fold, bns[fold.bn], modules[fold.layer])
        _replace_module(model, fold.bn, nn.Identity())
        logger.debug("folded %s into %s (%s)", fold.bn, fold.layer, fold.position)
    unused = sorted(set(bns) - {fold.bn for fold in plan})
    if unused:
        # never called as a module in the traced graphs: unused, so there is nothing to fold
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


def _graphs(module: nn.Module, prefix: str = "") -> list[fx.Graph]:
    """fx graphs covering every BatchNorm call: the whole model's, or its largest traceable parts'.

    When a module's forward cannot be traced (data-dependent control flow, input checks that raise —
    most Hugging Face models), its children that hold BatchNorms are traced one by one instead. That
    assumes the untraced forward calls those children as a whole, not their inner layers one by one;
    the parity check after the rewrite is the backstop. A BatchNorm called directly from an
    untraceable forward is refused. Node targets are rewritten to names qualified from the root.
    """
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as exc:  # fx raises many types (TraceError, TypeError, …) for untraceable code
        graphs = []
        for name, child in module.named_children():
            if isinstance(child, _BatchNorm):
                raise NotApplicable(
                    f"BatchNorm {prefix + name!r} is called from {type(module).__name__}.forward, which "
                    f"torch.fx cannot trace, so its neighbours cannot be proved ({type(exc).__name__}: {exc})"
                ) from exc
            if any(isinstance(m, _BatchNorm) for m in child.modules()):
                graphs += _graphs(child, f"{prefix}{name}.")
        return graphs
    for node in graph.nodes:  # the graph is only read, never run
        if node.op == "call_module":
            node.target = prefix + node.target
    return [graph]


def _plan(model: nn.Module, bns: dict[str, _BatchNorm]) -> list[_Fold]:
    """Where each called BatchNorm folds; NotApplicable for the first one that cannot."""
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for graph in _graphs(model):
        for node in graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
    shared = _shared_parameter_owners(model)
    plan = []
    for name in bns:
        nodes = calls.get(name, [])
        if len(nodes) > 1:
            raise NotApplicable(
                f"BatchNorm {name!r} is called {len(nodes)} times; folding it would need one copy per call"
            )
        if nodes:
            plan.append(_place(name, nodes[0], modules, calls, shared))
    return plan


def _place(name: str, node: fx.Node, modules: _Modules, calls: _Calls, shared: set[str]) -> _Fold:
    """Fold into the producer when that is safe, else into the consumer, else refuse with the reason."""
    bn = modules[name]
    producer = node.args[0] if node.args else None
    post_reason = _post_blocker(bn, producer, modules, calls, shared)
    if post_reason is None:
        return _Fold(name, producer.target, "post")
    consumer = next(iter(node.users)) if len(node.users) == 1 else None
    pre_reason = _pre_blocker(bn, node, consumer, modules, calls, shared)
    if pre_reason is None:
        return _Fold(name, consumer.target, "pre")
    raise NotApplicable(f"BatchNorm {name!r} cannot be folded: {post_reason}; and {pre_reason}")


def _post_blocker(
    bn: _BatchNorm, producer: object, modules: _Modules, calls: _Calls, shared: set[str]
) -> str | None:
    """Why `bn` cannot fold into the layer that produces its input (None when it can)."""
    if not _is_call(producer, modules, _PRODUCERS):
        return "its input is not produced by a Conv, ConvTranspose or Linear"
    layer = modules[producer.target]
    if len(producer.users) > 1:
        readers = ", ".join(str(user) for user in producer.users)
        return f"its producer {producer.target!r} has a second consumer ({readers})"
    if len(calls[producer.target]) > 1:
        return f"its producer {producer.target!r} is called more than once"
    if producer.target in shared:
        return f"its producer {producer.target!r} shares parameters with another layer"
    if _out_channels(layer) != bn.num_features:
        channels = _out_channels(layer)
        return f"its producer {producer.target!r} has {channels} channels, the BatchNorm {bn.num_features}"
    return None


def _pre_blocker(
    bn: _BatchNorm, node: fx.Node, consumer: fx.Node | None, modules: _Modules, calls: _Calls, shared: set[str],
) -> str | None:
    """Why `bn` cannot fold into the layer that reads its output (None when it can)."""
    if consumer is None:
        return f"its output has {len(node.users)} readers, not one Conv or Linear"
    if not _is_call(consumer, modules, _CONSUMERS) or consumer.args[0] is not node:
        return f"its output is read by {consumer}, not by a Conv or Linear"
    layer = modules[consumer.target]
    if isinstance(layer, _CONV) and _zero_padded(layer):
        return (
            f"its consumer {consumer.target!r} zero-pads its input (padding={layer.padding}), so folding "
            "would change the border outputs"
        )
    if len(calls[consumer.target]) > 1:
        return f"its consumer {consumer.target!r} is called more than once"
    if consumer.target in shared:
        return f"its consumer {consumer.target!r} shares parameters with another layer"
    if _in_channels(layer) != bn.num_features:
        channels = _in_channels(layer)
        return f"its consumer {consumer.target!r} reads {channels} channels, the BatchNorm has {bn.num_features}"
    return None


def _is_call(node: object, modules: _Modules, kinds: tuple[type, ...]) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    return isinstance(modules.get(node.target), kinds)


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
