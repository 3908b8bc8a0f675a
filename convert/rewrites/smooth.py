"""`smoothed`: move per-channel activation scales out of each norm and into the linear layers that read it.

For a norm u = γ⊙x̂ + β read only by linear layers y = W u + b, and any per-channel s > 0:

    W u + b = (W·diag(s)) (u / s) + b,   u / s = (γ/s)⊙x̂ + β/s

so dividing γ and β by s and multiplying the readers' input columns by s computes the same function
(exact in real arithmetic; done in float64 and cast once). What changes is the range of the norm's output:
chosen well, its outlier channels shrink, and a per-tensor int8 scale then fits it (SmoothQuant; the scale
half of RepQ-ViT's reparameterization, `../shared/papers.md`).

- SmoothQuant (`method="smoothquant"`, the default): s_j = max|X_j|^α / max|W_j|^(1−α), α ∈ [0, 1]
  (0.5 by default), with max|X_j| from calibration inputs and max|W_j| over every reader's column j.
- RepQ-ViT (`method="repq"`): s_j = r_j / mean(r), r_j = max X_j − min X_j, the per-channel range of the
  calibration activations (RepQ-ViT also shifts by per-channel zero points; that part is not done here).

A norm whose output is read by anything else (a Post-LN residual, a nonlinearity) cannot carry the scale in
its γ/β; it is left alone and the reason is recorded per norm (`SmoothingReport.skipped`, into the manifest).
With `post_ln_scale=True` a norm whose output is also the Post-LN residual (BERT) still gets the scale, made
explicit: each linear reader becomes `InputScaled`, computing (W·diag(s))(u ⊙ 1/s) — one elementwise Mul per
reader, the same function, and the tensor the quantizer sees is u/s (`SmoothingReport.scaled`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from convert.rewrites import NotApplicable
from convert.rewrites.analysis import analyse, example_inputs
from convert.rewrites.math import IN_OUT, OUT_IN
from convert.rewrites.records import NormUse

log = logging.getLogger(__name__)

METHODS = ("smoothquant", "repq")
MIN_SCALE = 1e-5  # a channel that is (almost) always zero keeps a scale ≥ this, so γ/s stays finite


@dataclass
class SmoothingReport:
    """Where the reparameterization was applied, and where not and why (written into the manifest)."""

    method: str
    alpha: float
    calibration_batches: int
    applied: dict[str, list[str]] = field(default_factory=dict)  # norm -> its readers' weights (scale in γ/β)
    skipped: dict[str, str] = field(default_factory=dict)  # norm -> why it was left alone
    scaled: dict[str, list[str]] = field(default_factory=dict)  # Post-LN norm -> readers given an explicit 1/s

    def as_dict(self) -> dict:
        return {"method": self.method, "alpha": self.alpha, "calibration_batches": self.calibration_batches,
                "applied": self.applied, "scaled": self.scaled, "skipped": self.skipped}


# ----------------------------------------------------------------------------- the math (pure, float64)

def smoothquant_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) (float64); a channel without activation or weight gets s_j = 1."""
    check_alpha(alpha)
    a, w = act_max.double().clamp_min(0), weight_max.double().clamp_min(0)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (a == 0) | (w == 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp_min(MIN_SCALE)


def repq_scales(act_min: torch.Tensor, act_max: torch.Tensor) -> torch.Tensor:
    """s_j = r_j / mean(r) with r_j the per-channel range (RepQ-ViT's per-channel → per-tensor scale)."""
    r = (act_max.double() - act_min.double()).clamp_min(0)
    if not r.any():
        return torch.ones_like(r)
    return (r / r.mean()).clamp_min(MIN_SCALE)


def divide_norm_affine(gamma: torch.Tensor, beta: torch.Tensor | None, s: torch.Tensor):
    """(γ/s, β/s) in float64, cast back to each tensor's dtype."""
    new_gamma = (gamma.double() / s).to(gamma.dtype)
    return new_gamma, None if beta is None else (beta.double() / s).to(beta.dtype)


def scale_input_columns(w: torch.Tensor, s: torch.Tensor, layout: str = OUT_IN) -> torch.Tensor:
    """W·diag(s): input column j times s_j ([out, in] for nn.Linear; rows for HF Conv1D's [in, out])."""
    shape = (1, -1) if layout == OUT_IN else (-1, 1)
    return (w.double() * s.reshape(shape)).to(w.dtype)


def input_column_absmax(w: torch.Tensor, layout: str = OUT_IN) -> torch.Tensor:
    """max_i |W_ij| per input channel j."""
    return w.detach().abs().amax(dim=0 if layout == OUT_IN else 1).double()


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")


# ----------------------------------------------------------------------------- where (re-pointable)

def smoothable_norms(model: nn.Module, inputs: dict[str, torch.Tensor] | None, *, post_ln: bool = False
                     ) -> tuple[list[NormUse], list[NormUse], dict[str, str]]:
    """(norms read only by linear layers, Post-LN norms whose linear readers can take an explicit scale — only
    with `post_ln` —, the others with the reason)."""
    analysis = analyse(model, inputs)
    eligible, explicit, skipped = [], [], {}
    for name, use in analysis.norms.items():
        reason = _why_not(model, use)
        if not reason:
            eligible.append(use)
        elif post_ln and _explicit_ok(model, use):
            explicit.append(use)
        else:
            skipped[name] = reason
    return eligible, explicit, skipped


def _explicit_ok(model: nn.Module, use: NormUse) -> bool:
    """Only other readers block it (the residual): every linear reader is a whole 2-D linear module."""
    only_readers = all("not by a linear layer" in b or "no bias that its forward reads" in b for b in use.blockers)
    spec_ok = use.spec is not None and not use.spec.problem and not use.spec.channels_first
    modules = [model.get_submodule(site.module) for site in use.readers]
    return bool(use.readers) and only_readers and spec_ok and all(
        getattr(m, site.weight).dim() == 2 and getattr(m, "groups", 1) == 1 and site.weight == "weight"
        and not isinstance(m, nn.MultiheadAttention) for m, site in zip(modules, use.readers, strict=True))


def _why_not(model: nn.Module, use: NormUse) -> str | None:
    spec = use.spec
    if use.blockers:
        return "; ".join(use.blockers)
    if spec is None or spec.problem:
        return spec.problem if spec is not None else f"{use.name} does not compute a known norm"
    if not use.readers:
        return f"{use.name}'s output is not read by any linear layer"
    if not spec.weight:
        return f"{use.name} has no γ to carry the scale"
    if spec.channels_first:
        return f"{use.name} normalizes channels-first (its readers are convolutions, not per-token linear layers)"
    for site in use.readers:
        owner = model.get_submodule(site.module)
        if getattr(owner, site.weight).dim() != 2 or getattr(owner, "groups", 1) != 1:
            return f"{use.name} is read by {site.module}, not a 2-D linear weight"
    return None


# ----------------------------------------------------------------------------- the module-level step

def smooth(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
           calibration: Iterable[dict[str, torch.Tensor]] | None = None, alpha: float = 0.5,
           method: str = "smoothquant", post_ln_scale: bool = False) -> nn.Module:
    """Reparameterize every smoothable norm of `model` (mutated and returned; `rewrite()` hands a copy).

    `calibration`: keyword-input batches whose norm outputs set the scales (default: `inputs`).
    The report is left on the returned model as `normfuse_smoothing` (a SmoothingReport).
    """
    if method not in METHODS:
        raise ValueError(f"unknown smoothing method {method!r}; expected one of {', '.join(METHODS)}")
    check_alpha(alpha)
    eligible, explicit, skipped = smoothable_norms(model, inputs, post_ln=post_ln_scale)
    if not eligible and not explicit:
        reason = next(iter(skipped.values()), f"{type(model).__name__} has no LayerNorm or RMSNorm")
        raise NotApplicable(f"no norm is read only by linear layers: {reason}")
    if calibration is not None:
        batches = list(calibration)
    else:  # the tracing inputs, or the model's own example (a rewrite called without calibration data)
        batches = [inputs if inputs is not None else example_inputs(model)]
    if not batches:
        raise ValueError("smoothing needs at least one calibration batch")
    stats = activation_ranges(model, [use.name for use in eligible + explicit], batches)
    report = SmoothingReport(method, alpha, len(batches), skipped=skipped)
    for use in eligible + explicit:
        low, high = stats[use.name]
        s = scales_for(model, use, low, high, alpha, method)
        (apply_scales if use in eligible else scale_readers)(model, use, s)
        target = report.applied if use in eligible else report.scaled
        target[use.name] = [f"{site.module}.{site.weight}" for site in use.readers]
    for name, why in skipped.items():
        log.info("smoothed: leaving %s as it is: %s", name, why)
    model.normfuse_smoothing = report
    return model


def activation_ranges(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of each named norm's output over the calibration batches (last axis = channels)."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(_module, _args, output):
            flat = output.detach().double().reshape(-1, output.shape[-1])
            low, high = flat.amin(0), flat.amax(0)
            if name in ranges:
                low, high = torch.minimum(ranges[name][0], low), torch.maximum(ranges[name][1], high)
            ranges[name] = (low, high)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in ranges]
    if missing:
        raise NotApplicable(f"calibration never reached {missing[0]}")
    return ranges


def scales_for(model: nn.Module, use: NormUse, low: torch.Tensor, high: torch.Tensor, alpha: float, method: str):
    if method == "repq":
        return repq_scales(low, high)
    weights = [getattr(model.get_submodule(site.module), site.weight) for site in use.readers]
    weight_max = torch.stack([input_column_absmax(w, site.layout) for w, site in zip(weights, use.readers, strict=True)])
    return smoothquant_scales(torch.maximum(low.abs(), high.abs()), weight_max.amax(0), alpha)


def apply_scales(model: nn.Module, use: NormUse, s: torch.Tensor) -> None:
    """γ ← γ/s, β ← β/s on the norm; W ← W·diag(s) on every reader (fresh tensors, never in place).

    γ is the scale as it acts (Gemma's x̂·(1+w): γ = 1 + w, so w ← (1+w)/s − 1)."""
    from convert.rewrites.probe import norm_affine
    from convert.rewrites.writer import write_tensor

    spec = use.spec
    weight = getattr(use.module, spec.weight)
    gamma, beta = norm_affine(use.module, spec)
    new_gamma, new_beta = divide_norm_affine(gamma.double(), None if beta is None else beta.double(), s.double().to(weight.device))
    write_tensor(model, use.name, spec.weight, (new_gamma - spec.offset).to(weight.dtype))
    if new_beta is not None:
        write_tensor(model, use.name, spec.bias, new_beta.to(beta.dtype))
    for site in use.readers:
        if site.layout not in (OUT_IN, IN_OUT):
            raise NotApplicable(f"{site.module}.{site.weight} has an unknown layout {site.layout!r}")
        weight = getattr(model.get_submodule(site.module), site.weight)
        write_tensor(model, site.module, site.weight, scale_input_columns(weight, s.to(weight.device), site.layout))


class InputScaled(nn.Module):
    """A linear layer whose weight holds W·diag(s), reading u ⊙ (1/s): the same function as the original on u."""

    def __init__(self, layer: nn.Module, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("inv_scale", inv_scale)  # (d,) 1/s, in the layer's dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.layer(x * self.inv_scale, *args, **kwargs)


def scale_readers(model: nn.Module, use: NormUse, s: torch.Tensor) -> None:
    """W ← W·diag(s) on every reader, each wrapped to read u/s (the norm itself is untouched)."""
    from convert.rewrites.writer import write_tensor

    for site in use.readers:
        layer = model.get_submodule(site.module)
        weight = layer.weight
        write_tensor(model, site.module, site.weight, scale_input_columns(weight, s.to(weight.device), site.layout))
        parent, _, child = site.module.rpartition(".")
        inv = (1.0 / s.double()).to(device=weight.device, dtype=weight.dtype)
        setattr(model.get_submodule(parent), child, InputScaled(layer, inv))


def inject_outliers(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
                    channels: tuple[int, ...] = (0,), factor: float = 50.0) -> nn.Module:
    """The stress model of the int8 benchmark: the same function, with outlier channels in every smoothable
    norm's output (γ_j, β_j × factor; the readers' column j ÷ factor), as trained LLMs/ViTs show them.
    Mutates and returns `model`; it is `apply_scales` with s_j = 1/factor on `channels`."""
    eligible, _, _ = smoothable_norms(model, inputs)
    if not eligible:
        raise NotApplicable(f"{type(model).__name__}: no norm read only by linear layers to give outliers")
    for use in eligible:
        s = torch.ones(use.spec.width, dtype=torch.float64)
        s[list(channels)] = 1.0 / factor
        apply_scales(model, use, s)
    return model
