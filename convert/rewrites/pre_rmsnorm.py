"""`rmsnorm`: Pre-LN → Pre-RMSNorm (notes §2).

In a Pre-LN model the residual stream is read only by LayerNorms, which ignore its mean. Re-centring
every writer of the stream (embeddings, cls/position parameters, attention-output and FFN-output
projections, every MoE expert: whatever the analysis finds) keeps the stream zero-mean at every depth,
and there LayerNorm equals RMSNorm with the same ε. γ/β are folded into the readers first. A model input
that is itself the stream is centred once where it enters (`CenteredInputs`).
"""

from __future__ import annotations

import torch
from torch import nn

from convert.modules import CenteredInputs, RMSNorm
from convert.rewrites import NotApplicable
from convert.rewrites.affine import fold_norm_into_readers, norm_affine, replace_module, write_tensor
from convert.rewrites.analysis import Analysis, Writer, analyse, example_inputs
from convert.rewrites.math import center_along, center_output_rows


def to_pre_rmsnorm(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Re-centre the residual stream's writers, fold γ/β, and swap every LayerNorm for an RMSNorm."""
    analysis = centre_residual_stream(model, inputs)
    for name, use in analysis.norms.items():
        # folded: γ = 1 stays as the explicit weight, β is gone; unfoldable (a reader is not linear): kept
        gamma, beta = norm_affine(use.module) if use.blockers else (None, None)
        like = use.module.weight if use.module.weight is not None else next(model.parameters())
        norm = RMSNorm(analysis.width, float(use.module.eps), bias=beta is not None).to(like.dtype).to(like.device)
        with torch.no_grad():
            for tensor, value in ((norm.weight, gamma), (norm.bias, beta)):
                if value is not None:
                    tensor.copy_(value)
        replace_module(model, name, norm)
    return _centre_inputs(model, analysis.writers)


def centre_residual_stream(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Analysis:
    """Check that the rewrite is exact, then fold γ/β and re-centre every writer (mutates `model`)."""
    inputs = example_inputs(model) if inputs is None else inputs
    analysis = analyse(model, inputs)
    _check(model, analysis)
    for use in analysis.norms.values():
        if not use.blockers:
            fold_norm_into_readers(model, use)
    for writer in analysis.writers:
        _centre(model, writer)
    return analysis


def _check(model: nn.Module, analysis: Analysis) -> None:
    if not analysis.norms:
        raise NotApplicable(f"{type(model).__name__} has no LayerNorm to convert")
    if analysis.stream_blockers:
        raise NotApplicable(analysis.stream_blockers[0])
    for name, use in analysis.norms.items():
        if use.kind != "layernorm":
            raise NotApplicable(f"{name} is an RMSNorm reading the residual stream: it is not mean-invariant, "
                                "so the stream cannot be re-centred (only the affine fold applies)")
        if len(use.module.normalized_shape) != 1:
            raise NotApplicable(f"{name} normalizes over {len(use.module.normalized_shape)} axes, not the hidden axis")
    if analysis.width is None:
        raise NotApplicable(f"{type(model).__name__}: the residual stream has no single width")


def _centre(model: nn.Module, writer: Writer) -> None:
    if writer.kind == "linear":
        site = writer.site
        owner = model.get_submodule(site.module)
        weight, bias = center_output_rows(getattr(owner, site.weight), getattr(owner, site.bias, None), site.layout)
        write_tensor(model, site.module, site.weight, weight)
        if bias is not None:
            write_tensor(model, site.module, site.bias, bias)
    elif writer.kind == "tensor":
        tensor = getattr(model.get_submodule(writer.module), writer.attr)
        write_tensor(model, writer.module, writer.attr, center_along(tensor, writer.axis))


def _centre_inputs(model: nn.Module, writers: list[Writer]) -> nn.Module:
    axes = {w.attr: w.axis for w in writers if w.kind == "input"}
    return CenteredInputs(model, axes) if axes else model
