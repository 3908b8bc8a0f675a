"""`crmsnorm`: Pre-LN → Pre-CRMSNorm, the residual stream stored at width d−1 (notes §3).

After the Pre-RMSNorm centring every stream vector is zero-mean, so its last entry is −Σ of the others
and need not be stored: writers drop that output, readers absorb the missing input
(W̃ = W[:, ≠k] − W[:, k]), and each LayerNorm becomes a CRMSNorm that divides by d. Which entry k is
dropped does not matter in exact arithmetic; in float16/bfloat16 it does (see `channel_to_drop`).
"""

from __future__ import annotations

import torch
from torch import nn

from convert.modules import CRMSNorm
from convert.rewrites import NotApplicable
from convert.rewrites.affine import replace_module, write_tensor
from convert.rewrites.analysis import call_inputs, example_inputs
from convert.rewrites.math import compress_readers, compress_writer, drop_along, in_axis, spans
from convert.rewrites.pre_rmsnorm import centre_residual_stream
from convert.rewrites.records import Analysis, LinearSite


def to_pre_crmsnorm(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Pre-RMSNorm centring, then store the residual stream at width d−1 (mutates and returns `model`)."""
    inputs = call_inputs(model, example_inputs(model) if inputs is None else inputs)
    analysis, _ = centre_residual_stream(model, inputs, boundaries=False, complete=True)
    blocked = [f"{name}'s output cannot be compressed: {use.blockers[0]}" for name, use in analysis.norms.items()
               if use.blockers]  # its output has width d−1: only linear readers can absorb the missing entry
    if blocked:
        raise NotApplicable(blocked[0])
    if any(writer.kind == "input" for writer in analysis.writers):
        raise NotApplicable("a model input is the residual stream: its width cannot be compressed")
    index = channel_to_drop(model, analysis, inputs)
    for writer in analysis.writers:
        if writer.kind in ("linear", "scaled"):
            _compress_writer(model, writer.site, index)
        if writer.kind != "linear":  # a tensor, or the (now all-ones) scale of a "scaled" writer
            tensor = getattr(model.get_submodule(writer.module), writer.attr)
            write_tensor(model, writer.module, writer.attr, drop_along(tensor, writer.axis, index))
            _sync_shape_attributes(model.get_submodule(writer.module))
    for name, use in analysis.norms.items():
        for site in use.readers:
            owner = model.get_submodule(site.module)
            weight = compress_readers(getattr(owner, site.weight), site.layout, index)
            write_tensor(model, site.module, site.weight, weight)
            _sync_shape_attributes(owner)
        like = next(model.parameters())
        replace_module(model, name, CRMSNorm(analysis.width, use.spec.eps).to(like.device, like.dtype))
    _check_runs(model, inputs, analysis.width)
    return model


def channel_to_drop(model: nn.Module, analysis: Analysis, inputs: dict[str, torch.Tensor]) -> int:
    """The stream channel whose reconstruction adds the least rounding error in low precision.

    The dropped entry k is rebuilt as −Σ(the others), so it carries the others' rounding errors, and every
    reader sees them through its column W[:, k]. Score each channel by Σ‖W[:, k]‖² over the readers times
    the mean square of the other channels at the norms' inputs (on the example inputs); drop the smallest.
    """
    width = analysis.width
    squares = torch.zeros(width, dtype=torch.float64)

    def record(module, args):
        squares.add_(args[0].detach().double().reshape(-1, width).pow(2).mean(0).cpu())

    hooks = [model.get_submodule(name).register_forward_pre_hook(record) for name in analysis.norms]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    columns = torch.zeros(width, dtype=torch.float64)
    for site in (site for use in analysis.norms.values() for site in use.readers):
        weight = getattr(model.get_submodule(site.module), site.weight).detach()
        if weight.dim() == 3:  # fused experts [E, out, in] / [E, in, out]: every expert's columns
            weight = weight.movedim(in_axis(site.layout), -1).reshape(-1, weight.shape[in_axis(site.layout)])
        along = 1 if site.layout == "in_out" else 0  # the output axis, summed over
        for start, length in spans(weight, along):  # a block of outputs at a time: no float64 copy of the head
            block = weight.narrow(along, start, length).to("cpu", torch.float64, copy=True)
            columns += block.pow_(2).sum(along)
    return int((columns * (squares.sum() - squares)).argmin())


def _compress_writer(model: nn.Module, site: LinearSite, index: int) -> None:
    owner = model.get_submodule(site.module)
    weight, bias = compress_writer(getattr(owner, site.weight), getattr(owner, site.bias, None), site.layout, index)
    write_tensor(model, site.module, site.weight, weight)
    if bias is not None:
        write_tensor(model, site.module, site.bias, bias)
    _sync_shape_attributes(owner)


def _sync_shape_attributes(module: nn.Module) -> None:
    """Keep the size attributes that forward() reads in step with a resized weight."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]
    elif isinstance(module, nn.Conv2d | nn.Conv1d):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif hasattr(module, "nf") and weight.dim() == 2:  # Hugging Face Conv1D: weight [nx, nf]
        module.nx, module.nf = weight.shape
    elif isinstance(getattr(module, "hidden_dim", None), int) and weight.dim() == 2:  # an MoE router [experts, in]
        module.hidden_dim = weight.shape[1]  # transformers' routers reshape their input to (-1, hidden_dim)


def _check_runs(model: nn.Module, inputs: dict[str, torch.Tensor], width: int) -> None:
    """Some modules hard-code the stream width (nn.MultiheadAttention checks embed_dim): run once to see."""
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as error:  # noqa: BLE001 - whatever broke, the compressed model does not run
        raise NotApplicable(
            f"{type(model).__name__} does not run with its residual stream compressed to width {width - 1}: {error}"
        ) from error
