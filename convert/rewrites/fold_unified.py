"""Fold Unified Normalization (completely) and PowerNorm's affine into the linear layers that read them.

In eval mode UN is y = s ⊙ x + β with s = γ/√(σ²_run + ε) fixed per channel, so for every reader
`Linear(W, b)` of y: W y + b = (W diag(s)) x + (b + W β). In a pre-norm transformer every reader of a norm
is a linear layer (qkv, fc1, the head), so all of UN disappears: the norm becomes nn.Identity and the
exported graph has no normalization left. PowerNorm is y = s ⊙ GS(x) + β with GS a per-token group RMS
scaling: the affine folds the same way, and the norm is replaced by its GroupScaling step, which stays.

Where the readers are is found on the rewrites' one graph front-end (`analysis.trace`, torch.export), by
the same reader rules as every norm's (`Graph.readers_of`): from the norm's output only ops that keep the
channel axis whole, ending in linear layers whose weight nothing else reads and whose forward reads a
bias to receive β. Anything else refuses with NotApplicable.
"""

from __future__ import annotations

import torch
from torch import nn

from convert.models.norms import PowerNorm, UnifiedNorm
from convert.rewrites import NotApplicable, math
from convert.rewrites.analysis import trace
from convert.rewrites.probe import NormSpec
from convert.rewrites.writer import linear_tensors, replace_module, write_linear

_NORMS = (UnifiedNorm, PowerNorm)


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


def fold_unified_norms(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Fold every eval-mode UnifiedNorm (completely) and PowerNorm (its affine) into its Linear readers.

    Mutates `model` (rewrite() hands in a deep copy) and returns the qualified names of the folded norms.
    `inputs`: keyword inputs to trace with (default: the model's example inputs). Checks every norm before
    changing anything; raises NotApplicable naming the layer and the reason.
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
    graph = trace(model, inputs)
    plan = {name: _readers(model, graph, name, norm) for name, norm in norms}
    for name, norm in norms:
        scale, shift = channel_affine(norm)
        for site in plan[name].readers:
            weight, bias = linear_tensors(model, site)
            write_linear(model, site, *math.fold_affine_into_linear(weight, bias, scale, shift, site.layout))
        replace_module(model, name, nn.Identity() if isinstance(norm, UnifiedNorm) else norm.group_scaling)
    return [name for name, _ in norms]


def _readers(model: nn.Module, graph, name: str, norm: nn.Module):
    """The norm's linear readers on the one graph front-end; NotApplicable with the first blocker."""
    spec = NormSpec("affine", float(norm.eps), -1, int(norm.weight.shape[0]), "weight", "bias")
    use = graph.readers_of(name, spec)
    for site in use.readers:
        weight = getattr(model.get_submodule(site.module), site.weight)
        if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
            raise NotApplicable(f"{name}: {site.module}.{site.weight} is tied to another parameter; untie it first")
    if use.blockers:
        raise NotApplicable(f"{name}: {use.blockers[0]}")
    if not use.readers:
        raise NotApplicable(f"{name}: its output reaches no linear layer to fold into")
    return use
