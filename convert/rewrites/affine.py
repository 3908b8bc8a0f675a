"""`affine`: fold every norm's γ, β into the linear layers that read its output (notes §1).

The norm keeps only its statistic; an nn.LayerNorm stays an nn.LayerNorm with weight = 1, bias = 0
(explicit tensors, so the exporters emit LayerNormalization with γ/β inputs and ONNX Runtime's
fusions keep firing, notes §1.3). Norms read by anything but linear layers are left as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from convert.rewrites import NotApplicable
from convert.rewrites.analysis import Analysis, NormUse, analyse
from convert.rewrites.math import fold_affine_into_linear

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


def fold_norm_into_readers(model: nn.Module, use: NormUse) -> None:
    """W ← W·diag(γ), b ← b + Wβ for every reader, then γ ← 1, β ← 0 on the norm."""
    gamma, beta = norm_affine(use.module)
    if beta is not None and not beta.any():
        beta = None  # nothing to add: do not create biases (each costs an Add in the exported graph)
    for site in use.readers:
        owner = model.get_submodule(site.module)
        bias = getattr(owner, site.bias, None)
        weight, bias = fold_affine_into_linear(getattr(owner, site.weight), bias, gamma, beta, site.layout)
        write_tensor(model, site.module, site.weight, weight)
        if bias is not None:
            write_tensor(model, site.module, site.bias, bias)
    for attr, fill in (("weight", torch.ones_like), ("bias", torch.zeros_like)):
        if isinstance(getattr(use.module, attr, None), torch.Tensor):
            write_tensor(model, use.name, attr, fill(getattr(use.module, attr)))


def norm_affine(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(γ, β) of a norm; β is None for RMSNorm and for LayerNorm(bias=False)."""
    gamma = getattr(module, "weight", None)
    beta = getattr(module, "bias", None) if isinstance(module, nn.LayerNorm) else None
    return gamma, beta


def write_tensor(model: nn.Module, module: str, attr: str, value: torch.Tensor) -> None:
    """Give `module.attr` a fresh tensor (never written in place, so a tied copy elsewhere keeps its value)."""
    owner = model.get_submodule(module)
    old = getattr(owner, attr, None)
    if attr in owner._buffers:
        owner._buffers[attr] = value.detach()
        return
    if old is not None and _is_shared(model, old):
        _untie_in_config(model)
    requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
    # a tensor the rewrite just computed is used as it is (a 50257×768 head is 0.15 GB: no second copy);
    # one over the storage of any of the model's tensors is copied, so nothing ever aliases it
    value = value.detach()
    if _aliases(model, value):
        value = value.clone()
    setattr(owner, attr, nn.Parameter(value, requires_grad=requires_grad))


def _aliases(model: nn.Module, value: torch.Tensor) -> bool:
    if value.numel() == 0:
        return True  # an empty tensor has no storage to compare: copying it costs nothing
    pointer = value.untyped_storage().data_ptr()
    tensors = [*model.parameters(), *model.buffers()]
    return any(t.numel() and t.untyped_storage().data_ptr() == pointer for t in tensors)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, new)
    if isinstance(parent, nn.TransformerEncoderLayer):
        # its fused inference kernel (torch._transformer_encoder_layer_fwd) hard-codes LayerNorm from
        # norm1/norm2's tensors; this flag is only read to pick that fast path, so route around it
        parent.activation_relu_or_gelu = 0


def _foldable(model: nn.Module, use: NormUse) -> bool:
    gamma, beta = norm_affine(use.module)
    if use.blockers or not use.readers or (gamma is None and beta is None):
        return False
    if beta is not None:  # a bias is created where missing; the module needs a bias slot its forward reads
        for site in use.readers:
            owner = model.get_submodule(site.module)
            if getattr(owner, site.bias, None) is None and site.bias not in owner._parameters:
                use.blockers.append(f"{site.module} has no bias slot to receive {use.name}'s β")
                return False
    return True


def _no_fold_reason(model: nn.Module, analysis: Analysis) -> str:
    reasons = [b for use in analysis.norms.values() for b in use.blockers]
    if not analysis.norms:
        return f"{type(model).__name__} has no LayerNorm or RMSNorm"
    if not reasons:
        return f"{type(model).__name__}: no norm has a γ/β to fold"
    return f"none of the {len(analysis.norms)} norms can be folded: {reasons[0]}"


def _is_shared(model: nn.Module, tensor: torch.Tensor) -> bool:
    return sum(p is tensor for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _untie_in_config(model: nn.Module) -> None:
    """Hugging Face re-ties shared weights on save/load unless the config says otherwise (the HF model
    may sit inside a wrapper, so every submodule's config is updated)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
            log.info("untied the shared embedding/head weights (config.tie_word_embeddings = False)")
