"""`nonorm`: the benchmark-only "no-norm bound": every norm replaced by identity (shapes kept).

NOT exact and never served: it measures how fast the model could be if normalization cost nothing,
so each exact variant's gain can be reported as a fraction of this bound (notes §9).
"""

from __future__ import annotations

from torch import nn

from convert.rewrites import NotApplicable
from convert.rewrites.affine import replace_module
from convert.rewrites.probe import find_norms


def remove_norms(model: nn.Module) -> nn.Module:
    norms = [name for name, spec in find_norms(model).items() if not spec.problem]
    if not norms:
        raise NotApplicable(f"{type(model).__name__} has no LayerNorm or RMSNorm to remove")
    for name in norms:
        replace_module(model, name, nn.Identity())
    return model
