"""`affine`: fold every norm's γ, β into the linear layers that read its output (notes §1).

The norm keeps only its statistic; an nn.LayerNorm stays an nn.LayerNorm with weight = 1, bias = 0
(Gemma's x̂·(1+w): w = 0), explicit tensors so the exporters emit LayerNormalization with γ/β inputs and ONNX Runtime's
fusions keep firing, notes §1.3. Norms read by anything but linear layers are left as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from convert.rewrites import NotApplicable
from convert.rewrites.analysis import analyse
from convert.rewrites.probe import NormSpec, probe_norm
from convert.rewrites.probe import norm_affine as probe_affine
from convert.rewrites.records import Analysis, NormUse
from convert.rewrites.writer import fold_norm_into_readers, replace_module, write_tensor

__all__ = ["fold_affine", "fold_norm_into_readers", "norm_affine", "replace_module", "write_tensor"]

log = logging.getLogger(__name__)


def fold_affine(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fold γ/β of every norm whose output is read only by linear layers; mutates and returns `model`."""
    analysis = analyse(model, inputs)
    foldable = [use for use in analysis.norms.values() if _foldable(model, use)]
    if not foldable:
        raise NotApplicable(_no_fold_reason(model, analysis))
    for use in analysis.norms.values():
        if use not in foldable:
            log.info("affine: leaving %s as it is: %s", use.name, "; ".join(use.blockers) or "no affine")
    for use in foldable:
        fold_norm_into_readers(model, use)
    return model


def norm_affine(module: nn.Module, spec: NormSpec | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(γ, β) of a norm as they act (Gemma's x̂·(1+w): γ = 1 + w); None where it has none."""
    spec = spec or probe_norm(module)
    return (None, None) if spec is None or spec.problem else probe_affine(module, spec)


def _foldable(model: nn.Module, use: NormUse) -> bool:
    """No blocker (the analysis checks the readers, their bias slots and the norm's form) and a γ/β to fold."""
    gamma, beta = norm_affine(use.module, use.spec)
    return not use.blockers and bool(use.readers) and (gamma is not None or beta is not None)


def _no_fold_reason(model: nn.Module, analysis: Analysis) -> str:
    reasons = [b for use in analysis.norms.values() for b in use.blockers]
    if not analysis.norms:
        return f"{type(model).__name__} has no layer computing a LayerNorm or RMSNorm"
    if not reasons:
        return f"{type(model).__name__}: no norm has a γ/β to fold"
    return f"none of the {len(analysis.norms)} norms can be folded: {reasons[0]}"
