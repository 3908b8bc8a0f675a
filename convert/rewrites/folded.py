"""`folded`: fold every normalization whose statistics are fixed at inference into its neighbours.

BatchNorm (running statistics) folds into the adjacent conv/linear; Unified Normalization and
PowerNorm's affine (fixed statistics, trained in) fold into the neighbouring linear layers. Each folding
pass mutates the copy it is given and returns the names of the layers it removed.
"""

from __future__ import annotations

import torch

from convert.rewrites import NotApplicable


def fold_statistics(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    from convert.rewrites.fold_batchnorm import fold_batchnorms
    from convert.rewrites.fold_unified import fold_unified_norms

    # each pass refuses a norm module left in training mode (its statistics are not fixed yet)
    folded = fold_batchnorms(model, inputs) + fold_unified_norms(model, inputs)
    if not folded:
        raise NotApplicable(
            f"{type(model).__name__} has no BatchNorm, UnifiedNorm or PowerNorm layer with fixed statistics to fold"
        )
    return model
