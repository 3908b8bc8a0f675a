"""Unified Normalization and PowerNorm: batch-statistics norms for transformers whose inference form folds.

Both take token tensors x of shape [B, N, C] (an optional `pad_mask` [B, N], True on padding, keeps padding
tokens out of the statistics) and normalise each channel c by a second moment pooled over the batch's
tokens — no mean subtraction, unlike LayerNorm's per-token statistics. In eval mode the statistics are fixed
running values, so UN is a per-channel affine (and folds away completely: convert/rewrites/fold_unified.py)
and PowerNorm is a per-token group scaling followed by a per-channel affine (only the affine folds).

Written from the papers' equations and checked against the reference code's behaviour:
  UN  — Yang et al., "Unified Normalization for Accelerating and Stabilizing Transformers", ACM MM 2022
        (hikvision-research/Unified-Normalization, `UN1d` / `UN2dFunction`).
  PN  — Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020, Algorithm 1
        (sIncerass/powernorm, `MaskPowerNorm` / `PowerFunction` / `GroupScaling1D`).
"""

from __future__ import annotations

import torch
from torch import nn


def _tokens(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """The non-padding tokens of x [B, N, C] as rows [T, C]."""
    if x.dim() != 3:
        raise ValueError(f"expected a [B, N, C] token tensor, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.size(-1)) if pad_mask is None else x[~pad_mask]


def _channel_mean(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Per-channel mean of t [B, N, C] over the tokens selected by `rows` (all tokens when None)."""
    return t.reshape(-1, t.size(-1)).mean(0) if rows is None else t[rows].mean(0)


# ----------------------------------------------------------------------------- Unified Normalization

class _UNFunction(torch.autograd.Function):
    """UN training step: smoothed statistics forward, approximate (compensated) gradient backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, un: UnifiedNorm, pad_mask):
        it, K = int(un.iters), un.window_size
        m2 = _tokens(x, pad_mask).pow(2).mean(0)                                    # [C] second moment
        prev_spread = torch.var(un.buffer_x2.sqrt())      # τ/K: variance of the window's √m2 before this batch
        slot = it % K
        un.buffer_x2[slot] = m2
        skip = K <= 1
        if it >= un.warmup_iters and un.outlier_filtration:
            am = un.buffer_x2.mean(0)                                               # arithmetic mean, [C]
            gm = un.buffer_x2.log().mean(0).exp()                                   # geometric mean, [C]
            if bool(((am - gm) > prev_spread * K).any()):                           # an outlier batch
                un.buffer_x2[slot] = un.running_var
                un.skip_counter += 1
                skip = True
        if it <= K or it < un.warmup_iters or skip:
            var = m2                                                                # the batch's own statistic
        else:
            var = un.buffer_x2.log().mean(0).exp()                                  # fluctuation smoothing (GM)
        std = (var + un.eps).sqrt()
        r = std / (un.running_var + un.eps).sqrt()                                  # gradient compensation
        r = torch.ones_like(r) if it <= un.compensation_warmup or skip else r.clamp(1 / 5, 5)
        un.running_var.mul_(un.momentum).add_((1 - un.momentum) * var)
        z = x / std                                                                 # [B, N, C]
        ctx.save_for_backward(z, std, weight, r, pad_mask if pad_mask is not None else torch.empty(0))
        ctx.un, ctx.it, ctx.skip, ctx.has_mask = un, it, skip, pad_mask is not None
        return weight * z + bias

    @staticmethod
    def backward(ctx, grad_y):
        z, std, weight, r, pad_mask = ctx.saved_tensors
        un, it = ctx.un, ctx.it
        K = un.window_size
        rows = ~pad_mask if ctx.has_mask else None
        g = grad_y * weight * r                                                     # compensated ∂L/∂z
        gz = _channel_mean(g * z, rows)                                             # [C] ⟨g·z⟩ of this batch
        un.buffer_gz[it % K] = un.ema_gz if ctx.skip else gz
        if it <= K or it < un.warmup_iters or ctx.skip:
            mean_gz = gz
        else:
            mean_gz = un.buffer_gz.mean(0)                                          # window mean of ⟨g·z⟩
        un.ema_gz.mul_(un.momentum).add_((1 - un.momentum) * mean_gz)
        psi = mean_gz if ctx.skip else un.ema_gz
        grad_x = (g - psi * z) / std
        dims = tuple(range(grad_y.dim() - 1))
        return grad_x, (grad_y * r * z).sum(dims), grad_y.sum(dims), None, None


class UnifiedNorm(nn.Module):
    r"""Unified Normalization (UN) over the channels of [B, N, C] token tensors.

    Training forward, at iteration t with window size K (UN §3, "fluctuation smoothing" and "adaptive
    outlier filtration"):

    * per-channel second moment over the batch's non-padding tokens: m2_t,c = mean_{b,n} x²_{b,n,c};
    * fluctuation smoothing — the statistic is the geometric mean of the last K second moments,
      σ̂²_t = exp( (1/K) Σ_{k<K} log m2_{t−k} ); the batch's own m2_t is used while t ≤ K or t < warm-up;
    * adaptive outlier filtration (optional) — with AM_c / GM_c the arithmetic / geometric means of the
      window and τ = K · Var(√m2) over the previous window, a batch with AM_c − GM_c > τ for any c is an
      outlier: its window slot takes the running statistic and it is normalised with its own m2_t;
    * y = γ ⊙ x / √(σ̂² + ε) + β, and the running statistic σ²_run ← m σ²_run + (1 − m) σ̂² (m = 0.9).

    Backward (approximate, following PowerNorm's): gradient compensation r = √(σ̂²+ε)/√(σ²_run+ε),
    clamped to [1/5, 5] (1 during the first `compensation_warmup` iterations or on outliers); g = r γ ⊙ ∂L/∂y;
    ψ ← m ψ + (1 − m) · mean_window⟨g ⊙ z⟩ (the batch's own ⟨g ⊙ z⟩ while warming up);
    ∂L/∂x ≈ (g − ψ ⊙ z) / √(σ̂² + ε), with z = x / √(σ̂² + ε). With m = 0 and no smoothing this is the
    exact gradient of x / √(mean x² + ε).

    Inference: y = γ ⊙ x / √(σ²_run + ε) + β — a fixed per-channel affine, which is what makes UN fold.
    """

    def __init__(self, channels: int, window_size: int = 4, warmup_iters: int = 4000,
                 outlier_filtration: bool = False, eps: float = 1e-5, momentum: float = 0.9,
                 compensation_warmup: int | None = None):
        super().__init__()
        self.channels, self.window_size, self.warmup_iters = channels, window_size, warmup_iters
        self.outlier_filtration, self.eps, self.momentum = outlier_filtration, eps, momentum
        # the reference code turns compensation on after max(1000, warm-up) iterations
        self.compensation_warmup = max(1000, warmup_iters) if compensation_warmup is None else compensation_warmup
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("ema_gz", torch.zeros(channels))
        self.register_buffer("buffer_x2", torch.zeros(window_size, channels))
        self.register_buffer("buffer_gz", torch.zeros(window_size, channels))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))
        self.register_buffer("skip_counter", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.channels}, window={self.window_size}, warmup={self.warmup_iters}, "
                f"outlier_filtration={self.outlier_filtration}, eps={self.eps}, momentum={self.momentum}")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            self.iters += 1
            return _UNFunction.apply(x, self.weight, self.bias, self, pad_mask)
        return x * self.inference_scale() + self.bias

    def inference_scale(self) -> torch.Tensor:
        """s = γ / √(σ²_run + ε): eval-mode UN is y = s ⊙ x + β."""
        return self.weight * torch.rsqrt(self.running_var + self.eps)


# ----------------------------------------------------------------------------- PowerNorm

class GroupScaling(nn.Module):
    r"""PowerNorm's per-token group scaling: split C into G groups, divide each by its RMS.

    GS(x)_c = x_c / √(mean_{c' ∈ group(c)} x²_{c'} + ε). A γ-free grouped RMSNorm; it runs in training and
    at inference, so it is what remains of a PowerNorm after its affine is folded.
    """

    def __init__(self, group_num: int = 1, eps: float = 1e-5):
        super().__init__()
        self.group_num, self.eps = group_num, eps

    def extra_repr(self) -> str:
        return f"groups={self.group_num}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(-1, (self.group_num, -1))                             # [..., G, C/G]
        rms = (grouped.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()             # [..., G, 1]
        return (grouped / rms).reshape(x.shape)  # [..., C]; not flatten(-2), which exports as a 2-D Flatten


class _PowerFunction(torch.autograd.Function):
    """PowerNorm training step (Algorithm 1): quadratic-mean forward, approximate backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, pn: PowerNorm, pad_mask):
        it = int(pn.iters)
        m2 = _tokens(x, pad_mask).pow(2).mean(0)                                    # [C] batch quadratic mean
        psi2 = m2 if it <= pn.warmup_iters else pn.running_phi                      # warm-up: batch statistic
        z = x / (psi2 + pn.eps).sqrt()
        if it < pn.warmup_iters:                                                    # cumulative average ...
            pn.running_phi.mul_((it - 1) / it).add_(m2 / it)
        pn.running_phi.mul_(pn.alpha_fwd).add_((1 - pn.alpha_fwd) * m2)             # ... then (always) the EMA
        ctx.save_for_backward(z, m2, weight, pad_mask if pad_mask is not None else torch.empty(0))
        ctx.pn, ctx.has_mask = pn, pad_mask is not None
        return weight * z + bias

    @staticmethod
    def backward(ctx, grad_y):
        z, m2, weight, pad_mask = ctx.saved_tensors
        pn = ctx.pn
        g = grad_y * weight                                                         # ∂L/∂z
        approx = g - (1 - pn.alpha_bkw) * pn.ema_gz * z                             # g − ν_{t−1} ⊙ z
        pn.ema_gz.add_(_channel_mean(approx * z, ~pad_mask if ctx.has_mask else None))
        grad_x = approx / (m2 + pn.eps).sqrt()
        dims = tuple(range(grad_y.dim() - 1))
        return grad_x, (grad_y * z).sum(dims), grad_y.sum(dims), None, None


class PowerNorm(nn.Module):
    r"""PowerNorm (with the reference code's group scaling) over the channels of [B, N, C] tensors.

    Forward (Shen et al., Algorithm 1), on x̃ = GS(x) (GroupScaling, per token, G groups):

    * batch quadratic mean ψ²_B,c = mean_{b,n} x̃²_{b,n,c} (non-padding tokens; no mean subtraction);
    * ẑ = x̃ / √(ψ² + ε) with ψ² = ψ²_B during warm-up and the running ψ² afterwards;
    * y = γ ⊙ ẑ + β;
    * running ψ² ← α_f ψ² + (1 − α_f) ψ²_B (α_f = 0.9); during warm-up the reference code first replaces ψ²
      by the cumulative average of the batch statistics and then applies the same EMA step — kept as is.

    Backward (approximate, Algorithm 1): with ν = (1 − α_b) · ema_gz,
    ∂L/∂x̃ ≈ (∂L/∂ẑ − ν_{t−1} ⊙ ẑ) / √(ψ²_B + ε) and ν_t = ν_{t−1} (1 − (1 − α_b) Γ_t) + (1 − α_b) Λ_t,
    Γ = mean ẑ², Λ = mean(∂L/∂ẑ ⊙ ẑ) — the reference code keeps the unscaled ema_gz and adds
    mean((∂L/∂ẑ − ν ẑ) ⊙ ẑ) to it, which is the same recursion. GS is differentiated exactly by autograd.

    Inference: y = γ ⊙ GS(x) / √(ψ²_run + ε) + β. GS stays (a per-token statistic); the per-channel affine
    s = γ/√(ψ²_run + ε), β folds into the next linear layer.
    """

    def __init__(self, channels: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 warmup_iters: int = 10000, group_num: int = 1):
        super().__init__()
        if channels % group_num:
            raise ValueError(f"channels ({channels}) must be divisible by group_num ({group_num})")
        self.channels, self.eps, self.warmup_iters = channels, eps, warmup_iters
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_phi", torch.ones(channels))
        self.register_buffer("ema_gz", torch.zeros(channels))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))
        self.group_scaling = GroupScaling(group_num)

    def extra_repr(self) -> str:
        return (f"{self.channels}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"warmup={self.warmup_iters}")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.group_scaling(x)
        if self.training:
            self.iters += 1
            return _PowerFunction.apply(x, self.weight, self.bias, self, pad_mask)
        return x * self.inference_scale() + self.bias

    def inference_scale(self) -> torch.Tensor:
        """s = γ / √(ψ²_run + ε): eval-mode PowerNorm is y = s ⊙ GS(x) + β."""
        return self.weight * torch.rsqrt(self.running_phi + self.eps)
