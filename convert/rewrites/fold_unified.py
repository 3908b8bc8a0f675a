"""Fold Unified Normalization (completely) and PowerNorm's affine into the linear layers that read them.

In eval mode UN is y = s ⊙ x + β with s = γ/√(σ²_run + ε) fixed per channel, so for every reader
`Linear(W, b)` of y: W y + b = (W diag(s)) x + (b + W β). In a pre-norm transformer every reader of a norm
is a linear layer (qkv, fc1, the head), so all of UN disappears: the norm becomes nn.Identity and the
exported graph has no normalization left. PowerNorm is y = s ⊙ GS(x) + β with GS a per-token group RMS
scaling: the affine folds the same way, and the norm is replaced by its GroupScaling step, which stays.

Where the readers are is found with torch.fx (norms and Linear layers traced as leaves), not from module
names: starting at each call of the norm, the analysis follows only ops that commute with a per-channel
affine on the last axis (indexing that keeps the channel axis whole, Identity, eval-mode Dropout) and
requires every path to end in an nn.Linear used nowhere else. Anything else refuses with NotApplicable.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from convert.models.norms import PowerNorm, UnifiedNorm
from convert.rewrites import NotApplicable, math

_NORMS = (UnifiedNorm, PowerNorm)
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout)


# ----------------------------------------------------------------------------- the math (float64)

def channel_affine(norm: UnifiedNorm | PowerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, β) in float64 with eval-mode norm(x) = s ⊙ x + β (UN) or s ⊙ GS(x) + β (PowerNorm)."""
    running = norm.running_var if isinstance(norm, UnifiedNorm) else norm.running_phi
    scale = norm.weight.detach().double() / (running.detach().double() + norm.eps).sqrt()
    return scale, norm.bias.detach().double()


def fold_affine_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                            shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W diag(s), b' = b + W β (W the original weight): `math.fold_affine_into_linear`, bias always made."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return math.fold_affine_into_linear(weight.detach(), bias.detach(), scale, shift)


# ----------------------------------------------------------------------------- where the readers are

class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_NORMS, nn.Linear)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return _LeafTracer().trace(model)
    except Exception as exc:  # data-dependent control flow and the like: we cannot prove the fold safe
        raise NotApplicable(
            f"{type(model).__name__}: torch.fx cannot trace the model ({type(exc).__name__}: {exc}), "
            "so the readers of its UnifiedNorm/PowerNorm layers cannot be checked"
        ) from exc


def _rank_after_index(index, rank: int) -> int | None:
    """Rank after `t[index]` for a tensor of `rank`, or None when the index touches the last (channel) axis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (torch.fx.Node, list, torch.Tensor)) or i is None for i in items):
        return None  # advanced / tensor / newaxis indexing: not worth proving
    if items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        trailing = items[items.index(Ellipsis) + 1:]
        if trailing and trailing[-1] != slice(None):
            return None
        items = [i for i in items if i is not Ellipsis]
    elif len(items) == rank and items[-1] != slice(None):
        return None
    if len(items) > rank:
        return None
    return rank - sum(isinstance(i, int) for i in items)


def _reads_metadata_only(node: torch.fx.Node) -> bool:
    """x.size(), x.dim(), x.shape, x.dtype …: these read no values, so they do not block a fold."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device", "ndim")


def _linear_readers(model: nn.Module, graph: torch.fx.Graph, norm_name: str) -> list[str]:
    """Qualified names of the Linear layers that read `norm_name`'s output; NotApplicable otherwise."""
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == norm_name]
    frontier = [(user, 3) for call in calls for user in call.users]  # norms take [B, N, C]
    readers: list[str] = []
    while frontier:
        node, rank = frontier.pop()
        module = modules.get(node.target) if node.op == "call_module" else None
        if _reads_metadata_only(node):
            continue
        if isinstance(module, nn.Linear):
            readers.append(node.target)
            continue
        if isinstance(module, _TRANSPARENT_MODULES) and not (isinstance(module, nn.Dropout) and module.training):
            frontier += [(user, rank) for user in node.users]
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            new_rank = _rank_after_index(node.args[1], rank)
            if new_rank is not None:
                frontier += [(user, new_rank) for user in node.users]
                continue
        raise NotApplicable(
            f"{norm_name}: its output is read by `{node.format_node()}`, which is not a linear layer, so its "
            "per-channel affine cannot be folded away"
        )
    if not readers:
        raise NotApplicable(f"{norm_name}: its output reaches no linear layer to fold into")
    return sorted(set(readers))


def _check_exclusive(model: nn.Module, graph: torch.fx.Graph, norm_name: str, linear_name: str) -> None:
    """The Linear must be applied only to this norm's output and own its weight (not tied)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == linear_name]
    for call in calls:
        source = call.args[0]
        while source.op == "call_function" and source.target is operator.getitem or (
            source.op == "call_module" and isinstance(model.get_submodule(source.target), _TRANSPARENT_MODULES)
        ):
            source = source.args[0]
        if not (source.op == "call_module" and source.target == norm_name):
            raise NotApplicable(f"{norm_name}: {linear_name} is also applied to other inputs ({source.name})")
    weight = model.get_submodule(linear_name).weight
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        raise NotApplicable(f"{norm_name}: {linear_name}.weight is tied to another parameter; untie it first")


# ----------------------------------------------------------------------------- the module-level step

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_unified_norms(model: nn.Module) -> list[str]:
    """Fold every eval-mode UnifiedNorm (completely) and PowerNorm (its affine) into its Linear readers.

    Mutates `model` (rewrite() hands in a deep copy) and returns the qualified names of the folded norms.
    Checks every norm before changing anything; raises NotApplicable naming the layer and the reason.
    """
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _NORMS)]
    if not norms:
        return []
    for name, norm in norms:
        if norm.training:
            raise NotApplicable(
                f"{name}: {type(norm).__name__} is in training mode, so its statistics are not fixed; "
                "call model.eval() first"
            )
    graph = _trace(model)
    plan = {}
    for name, _ in norms:
        readers = _linear_readers(model, graph, name)
        for linear_name in readers:
            _check_exclusive(model, graph, name, linear_name)
        plan[name] = readers
    for name, norm in norms:
        scale, shift = channel_affine(norm)
        for linear_name in plan[name]:
            linear = model.get_submodule(linear_name)
            weight, bias = fold_affine_into_linear(linear.weight, linear.bias, scale, shift)
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
        _replace(model, name, nn.Identity() if isinstance(norm, UnifiedNorm) else norm.group_scaling)
    return [name for name, _ in norms]
