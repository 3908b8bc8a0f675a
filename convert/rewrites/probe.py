"""Find normalization layers by what they compute, not by their class name.

`probe_norm(module)` runs a norm-like module on seeded float64 inputs and fits its output to the forms
the rewrites know, channel by channel:

    y = g ⊙ x̂ + b,   x̂ = (x − mean(x)) / √(var(x) + ε)   (mean-subtracting: "layernorm")
                     x̂ = x / √(mean(x²) + ε)              ("rmsnorm": Llama, T5LayerNorm, Gemma)

over the channel axis, last (channels-last) or 1 (channels-first: ConvNeXt's LayerNorm, timm's
LayerNorm2d). g must be the module's weight (γ⊙x̂) or one plus it (Gemma's x̂·(1+w)), b its bias or 0.
ε is read from the module's attribute, or, where it exposes none (OLMo's weightless LayerNorm), found from
what the module computes (`find_eps`) and then held to the same fit.
What fits becomes a `NormSpec`; a module that looks like a norm but fits no form (ε outside the root,
several normalized axes, group statistics) gets a spec with `problem` set, so a rewrite can refuse with
that reason instead of not seeing the norm at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
_FIT = 1e-5  # relative residual of the fit: many norms compute in float32 (~1e-7), a wrong form is off by O(1)


@dataclass(frozen=True)
class NormSpec:
    """What a norm module computes: y = (offset + weight) ⊙ x̂ + bias over channel `axis`."""

    kind: str  # "layernorm" (subtracts the mean) or "rmsnorm"
    eps: float  # inside the root
    axis: int  # the normalized axis of the input: -1 (channels-last) or 1 (channels-first)
    width: int  # channels d
    weight: str | None = None  # attribute holding γ (or w of x̂·(1+w)); None: no scale
    bias: str | None = None  # attribute holding β; None: no shift
    offset: float = 0.0  # 0: γ⊙x̂ (LayerNorm, Llama's RMSNorm); 1: x̂·(1+w) (Gemma)
    problem: str | None = None  # why the module is norm-like but no exact rewrite can use it
    precision: str = "float64"  # "float32": it computes in float32 even in a float64 model (HF casts x̂)

    @property
    def channels_first(self) -> bool:
        return self.axis == 1


def looks_like_norm(module: nn.Module) -> bool:
    """A leaf module with at most a 1-D scale and shift, named like a norm or holding an ε; not a BatchNorm
    (running statistics: a fixed affine at inference, folded by the `folded` variant)."""
    if any(True for _ in module.children()) or any(n.startswith("running_") for n, _ in module.named_buffers()):
        return False
    params = list(module.parameters(recurse=False))
    if len(params) > 2:
        return False
    named = "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm | nn.RMSNorm)
    return named or (bool(params) and any(hasattr(module, a) for a in EPS_ATTRIBUTES))


def probe_norm(module: nn.Module) -> NormSpec | None:
    """The module's NormSpec, a NormSpec with `problem` for a norm-like module of another form, or None."""
    if not looks_like_norm(module):
        return None
    name = type(module).__name__
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(tuple(shape)) != 1:
        return _problem(name, f"normalizes over {len(tuple(shape))} axes {tuple(shape)}, not one channel axis")
    width = _width(module)
    if width is None:
        return None
    eps = _eps(module)
    if eps is None:
        eps = find_eps(module, width)
        if eps is None:
            return _problem(name, "has no ε attribute, and no ε explains what it computes", width)
    reasons = []
    for axis in (-1, 1):
        for kind in ("layernorm", "rmsnorm"):
            spec = _fit(module, kind, eps, axis, width)
            if isinstance(spec, NormSpec):
                return spec
            if spec:
                reasons.append(spec)
    reason = reasons[0] if reasons else "does not compute γ⊙x̂+β (LayerNorm or RMSNorm) with ε inside the root"
    return _problem(name, reason, width, eps)


def find_norms(model: nn.Module) -> dict[str, NormSpec]:
    """Every norm-like module by name with what it computes (a spec with `problem` when no exact form fits)."""
    return {name: spec for name, m in model.named_modules() if (spec := probe_norm(m)) is not None}


def norm_affine(module: nn.Module, spec: NormSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(γ, β) of y = γ⊙x̂ + β as they act (Gemma: γ = 1 + w, computed in float64); None where absent."""
    weight = getattr(module, spec.weight) if spec.weight else None
    bias = getattr(module, spec.bias) if spec.bias else None
    if weight is not None and spec.offset:
        weight = weight.detach().double() + spec.offset
    return weight, bias


def identity_affine(module: nn.Module, spec: NormSpec) -> dict[str, torch.Tensor]:
    """The tensors that make the norm's affine the identity (γ = 1, β = 0), kept explicit (notes §1.3)."""
    out = {}
    if spec.weight:
        weight = getattr(module, spec.weight)
        out[spec.weight] = torch.full_like(weight, 1.0 - spec.offset)
    if spec.bias:
        out[spec.bias] = torch.zeros_like(getattr(module, spec.bias))
    return out


def normalize(x: torch.Tensor, kind: str, eps: float, axis: int = -1) -> torch.Tensor:
    """x̂ over `axis` (the reference the probe fits against)."""
    if kind == "layernorm":
        x = x - x.mean(axis, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(axis, keepdim=True) + eps)


def find_eps(module: nn.Module, width: int) -> float | None:
    """ε of a norm that does not expose it, from its outputs; None when no ε inside the root fits.

    On a zero-mean row x (where LayerNorm and RMSNorm agree), f(x) − f(−x) = 2g⊙x/√(m + ε) with m = mean(x²),
    whatever g and b are; at scale s, r = [f(sx) − f(−sx)] / [f(x) − f(−x)] = s√(m + ε)/√(s²m + ε), so
    ε = s²m(1 − r²)/(r² − s²). That is well conditioned where s²m is near ε, so the scales sweep 1 … 1e-16 and
    the estimate taken is the one whose s²m is closest to it. `_fit` then checks it like any read ε.
    """
    for axis in (-1, 1):
        estimate = _eps_along(module, width, axis)
        if estimate is not None:
            return estimate
    return None


def _eps_along(module: nn.Module, width: int, axis: int) -> float | None:
    shape = (4, 3, width) if axis == -1 else (2, width, 3, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x - x.mean(axis, keepdim=True)
    x = x / x.pow(2).mean(axis, keepdim=True).sqrt()  # m = 1 on every row
    probe = copy.deepcopy(module).cpu().double()
    try:
        with torch.no_grad():
            base = (probe(x) - probe(-x)).double()
            candidates = []
            for k in range(0, 17):
                s = 10.0 ** -k
                r = ((probe(s * x) - probe(-s * x)).double() / base).median().item()
                if r * r > s * s and r * r < 1:
                    estimate = s * s * (1 - r * r) / (r * r - s * s)
                    candidates.append((abs(torch.log10(torch.tensor(s * s / estimate)).item()), estimate))
    except Exception:  # noqa: BLE001 - this layout is not what the module takes
        return None
    if not candidates or base.shape != x.shape:
        return None
    estimate = min(candidates)[1]
    nice = float(f"{estimate:.1g}")  # 1e-05, not 1.0000003e-05 (a float32 norm rounds the estimate)
    return nice if abs(nice - estimate) <= 1e-3 * estimate else estimate


# --- the fit ---------------------------------------------------------------------------------------
def _fit(module: nn.Module, kind: str, eps: float, axis: int, width: int) -> NormSpec | str | None:
    generator = torch.Generator().manual_seed(0)
    shape = (3, 5, width) if axis == -1 else (2, width, 3, 2)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.4
    # two scales: an ordinary one, and one where mean(x²) ≈ ε, so that ε's value and place (inside the
    # root or not) change the output by O(1), well above float32 rounding (many norms compute in float32)
    x = torch.cat([x * 2, x * max(eps, 1e-30) ** 0.5], dim=0)
    try:
        with torch.no_grad():
            y = copy.deepcopy(module).cpu().double()(x)
    except Exception:  # noqa: BLE001 - this layout is not what the module takes
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    xs = normalize(x, kind, eps, axis).movedim(axis, -1).reshape(-1, width)
    ys = y.double().movedim(axis, -1).reshape(-1, width)
    scale, shift = _regress(xs, ys)
    residual = float((ys - (xs * scale + shift)).abs().max() / (1 + ys.abs().max()))
    if residual > _FIT:
        return None
    weight, offset = _match_scale(module, scale)
    bias = _match_shift(module, shift, weight)
    if weight is False or bias is False:
        return f"computes a {kind} whose scale/shift are not its own weight/bias"
    return NormSpec(kind, eps, axis, width, weight, bias, offset, precision="float64" if residual < 1e-12 else "float32")


def _regress(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares ys ≈ scale·xs + shift."""
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    scale = (xc * yc).sum(0) / (xc * xc).sum(0).clamp_min(1e-300)
    return scale, ys.mean(0) - scale * xs.mean(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def _vectors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().cpu() for n, p in module.named_parameters(recurse=False) if p.dim() == 1}


def _match_scale(module: nn.Module, scale: torch.Tensor) -> tuple[str | None | bool, float]:
    for name, value in _vectors(module).items():
        for offset in (0.0, 1.0):
            if _close(scale, value + offset):
                return name, offset
    return (None, 0.0) if _close(scale, torch.ones_like(scale)) else (False, 0.0)


def _match_shift(module: nn.Module, shift: torch.Tensor, weight: str | None | bool) -> str | None | bool:
    for name, value in _vectors(module).items():
        if name != weight and _close(shift, value):
            return name  # an all-zero β is still the module's β: the rewrites keep it explicit
    return None if _close(shift, torch.zeros_like(shift)) else False


def _width(module: nn.Module) -> int | None:
    for value in _vectors(module).values():
        return int(value.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return int(tuple(shape)[-1])
    for attr in ("dim", "hidden_size", "num_features", "normalized_dim"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def _eps(module: nn.Module) -> float | None:
    for attr in EPS_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int | float):
            return float(value)
    if isinstance(module, nn.RMSNorm):  # eps=None: the input dtype's machine epsilon (the probe runs in float64)
        return torch.finfo(torch.float64).eps
    return None


def _problem(name: str, reason: str, width: int = 0, eps: float = 0.0) -> NormSpec:
    return NormSpec("unknown", eps, -1, width, problem=f"{name} {reason}")
