"""The one place the rewrites write into a model: tensors, whole modules, and a norm's γ/β into its readers.

Every site comes from the graph analysis (`LinearSite`: module, weight attribute, the bias the op reads,
layout), never from attribute-name guesses. Tensors are replaced, never written in place, so a tied copy
elsewhere (or the caller's model, with `share_weights`) keeps its value.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from convert.rewrites.math import fold_affine_into_linear
from convert.rewrites.probe import identity_affine, norm_affine, probe_norm
from convert.rewrites.records import LinearSite, NormUse

log = logging.getLogger(__name__)


def fold_norm_into_readers(model: nn.Module, use: NormUse) -> None:
    """W ← W·diag(γ), b ← b + Wβ for every reader, then the norm's affine becomes the identity (kept explicit)."""
    spec = use.spec or probe_norm(use.module)
    gamma, beta = norm_affine(use.module, spec)
    if beta is not None and not beta.any():
        beta = None  # nothing to add: do not create biases (each costs an Add in the exported graph)
    for site in use.readers:
        write_linear(model, site, *fold_affine_into_linear(*linear_tensors(model, site), gamma, beta, site.layout,
                                                           getattr(model.get_submodule(site.module), "groups", 1)))
    for attr, value in identity_affine(use.module, spec).items():
        write_tensor(model, use.name, attr, value)


def linear_tensors(model: nn.Module, site: LinearSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a linear site; bias None when the op reads none."""
    owner = model.get_submodule(site.module)
    return getattr(owner, site.weight), getattr(owner, site.bias) if site.bias else None


def write_linear(model: nn.Module, site: LinearSite, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a linear site a new weight and (when not None) bias; a site without a bias slot cannot take one."""
    write_tensor(model, site.module, site.weight, weight)
    if bias is not None:
        if not site.bias:
            raise ValueError(f"{site.module} has no bias slot its forward reads")  # the analysis refuses this first
        write_tensor(model, site.module, site.bias, bias)


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
    if isinstance(old, torch.Tensor):
        value = value.to(old.device)
    if _aliases(model, value):
        value = value.clone()
    setattr(owner, attr, nn.Parameter(value, requires_grad=requires_grad))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, new)
    if isinstance(parent, nn.TransformerEncoderLayer):
        # its fused inference kernel (torch._transformer_encoder_layer_fwd) hard-codes LayerNorm from
        # norm1/norm2's tensors; this flag is only read to pick that fast path, so route around it
        parent.activation_relu_or_gelu = 0


def _aliases(model: nn.Module, value: torch.Tensor) -> bool:
    if value.numel() == 0:
        return True  # an empty tensor has no storage to compare: copying it costs nothing
    pointer = value.untyped_storage().data_ptr()
    tensors = [*model.parameters(), *model.buffers()]
    return any(t.numel() and t.untyped_storage().data_ptr() == pointer for t in tensors)


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
