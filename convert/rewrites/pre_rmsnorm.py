"""`rmsnorm`: Pre-LN → Pre-RMSNorm (notes §2).

In a Pre-LN model the residual stream is read only by LayerNorms, which ignore its mean. Re-centring
every writer of the stream (embeddings, cls/position parameters, attention-output and FFN-output
projections, every MoE expert: whatever the analysis finds) keeps the stream zero-mean at every depth,
and there LayerNorm equals RMSNorm with the same ε. γ/β are folded into the readers first.

Writers that have no weights to re-centre get one explicit mean subtraction ("centre at the boundary"):
a model input that is itself the stream (`CenteredInputs`), and the last norm of a Post-LN prefix or an
embedding LayerNorm whose output starts a Pre-LN stream (`Sequential(norm, Center())`). Streams that
cannot be re-centred (Post-LN blocks, where a norm's output is read by linear layers) keep LayerNorm.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from convert.modules import Center, CenteredInputs, RMSNorm
from convert.rewrites import NotApplicable
from convert.rewrites.affine import fold_norm_into_readers, norm_affine, replace_module, write_tensor
from convert.rewrites.analysis import analyse, example_inputs
from convert.rewrites.math import center_along, center_output_rows, scale_output_rows
from convert.rewrites.records import Analysis, Stream, Writer

log = logging.getLogger(__name__)


def to_pre_rmsnorm(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Re-centre the residual stream's writers, fold γ/β, and swap its LayerNorms for RMSNorms."""
    analysis, streams = centre_residual_stream(model, inputs)
    for name in (name for stream in streams for name in stream.norms):
        use = analysis.norms[name]
        # folded: γ = 1 stays as the explicit weight, β is gone; unfoldable (a reader is not linear): kept
        gamma, beta = norm_affine(use.module, use.spec) if use.blockers else (None, None)
        like = next(use.module.parameters(), None)
        like = like if like is not None else next(model.parameters())
        norm = RMSNorm(stream_width(streams), use.spec.eps, bias=beta is not None).to(like.device, like.dtype)
        with torch.no_grad():
            for tensor, value in ((norm.weight, gamma), (norm.bias, beta)):
                if value is not None:
                    tensor.copy_(value)
        replace_module(model, name, norm)
    for name in dict.fromkeys(b for stream in streams for b in stream.boundaries):
        replace_module(model, name, nn.Sequential(model.get_submodule(name), Center(-1)))
    return _centre_inputs(model, [w for stream in streams for w in stream.writers])


def centre_residual_stream(
    model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *, boundaries: bool = True, complete: bool = False
) -> tuple[Analysis, list[Stream]]:
    """Pick the streams that can be re-centred, fold their norms' γ/β and re-centre their writers
    (mutates `model`). `boundaries`: allow centring ops at Post-LN boundaries; `complete`: every norm."""
    analysis = analyse(model, example_inputs(model) if inputs is None else inputs)
    streams = _convertible(model, analysis, boundaries, complete)
    for name in (name for stream in streams for name in stream.norms):
        if not analysis.norms[name].blockers:
            fold_norm_into_readers(model, analysis.norms[name])
    for writer in (w for stream in streams for w in stream.writers):
        _centre(model, writer)
    return analysis, streams


def stream_width(streams: list[Stream]) -> int:
    (width,) = {stream.width for stream in streams}
    return width


def _convertible(model: nn.Module, analysis: Analysis, boundaries: bool, complete: bool) -> list[Stream]:
    if not analysis.norms:
        raise NotApplicable(f"{type(model).__name__} has no LayerNorm to convert")
    chosen, reasons = [], []
    # the widest-read stream first: its reason is the residual stream's, not a QK-norm's (OLMoE, Qwen3)
    for stream in sorted(analysis.streams, key=lambda stream: -len(stream.norms)):
        reason = _why_not(analysis, stream, boundaries)
        if reason:
            reasons.append(reason)
        else:
            chosen.append(stream)
    reason = ([r for r in reasons if "Post-LN" in r] or reasons or ["the streams have different widths"])[0]
    if not chosen or (complete and reasons) or len({s.width for s in chosen}) > 1:
        raise NotApplicable(reason)
    converted = sum(len(stream.norms) for stream in chosen)
    if 2 * converted <= len(analysis.norms):  # a Post-LN model with, say, a convertible embedding LN
        raise NotApplicable(f"{reason} (only {converted} of {len(analysis.norms)} norms read a stream "
                            "that can be re-centred: this is not a Pre-LN model)")
    for reason in reasons:
        log.info("keeping LayerNorm where %s", reason)
    return chosen


def _why_not(analysis: Analysis, stream: Stream, boundaries: bool) -> str | None:
    if stream.blockers:
        return stream.blockers[0]
    for name in stream.norms:
        spec = analysis.norms[name].spec
        if spec.problem:
            return f"{name}: {spec.problem}"
        if spec.kind != "layernorm":
            return (f"{name} is an RMSNorm reading the residual stream: it is not mean-invariant, so the stream "
                    "cannot be re-centred (only the affine fold applies)")
        if spec.channels_first:
            return f"{name} normalizes channels-first (axis 1), where the stream is read by convolutions"
    if stream.width is None:
        return f"the stream read by {stream.norms[0]} has no single width"
    if stream.boundaries and not boundaries:
        return f"{stream.boundaries[0]} is Post-LN: its output is the residual stream"
    if len(stream.norms) <= len(stream.boundaries):
        return (f"{stream.boundaries[0]} is Post-LN: its output is the residual stream; converting "
                f"{', '.join(stream.norms)} would need a centring op that costs what it saves")
    return None


def _centre(model: nn.Module, writer: Writer) -> None:
    if writer.kind in ("linear", "scaled"):
        site = writer.site
        owner = model.get_submodule(site.module)
        weight, bias = getattr(owner, site.weight), getattr(owner, site.bias, None)
        if writer.kind == "scaled":  # fold the per-channel scale into the linear first, then make it 1
            scale = getattr(model.get_submodule(writer.module), writer.attr)
            weight, bias = scale_output_rows(weight, bias, scale, site.layout)
            write_tensor(model, writer.module, writer.attr, torch.ones_like(scale))
        weight, bias = center_output_rows(weight, bias, site.layout)
        write_tensor(model, site.module, site.weight, weight)
        if bias is not None:
            write_tensor(model, site.module, site.bias, bias)
    elif writer.kind == "tensor":
        tensor = getattr(model.get_submodule(writer.module), writer.attr)
        write_tensor(model, writer.module, writer.attr, center_along(tensor, writer.axis))


def _centre_inputs(model: nn.Module, writers: list[Writer]) -> nn.Module:
    axes = {w.attr: w.axis for w in writers if w.kind == "input"}
    return CenteredInputs(model, axes) if axes else model
