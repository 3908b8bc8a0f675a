"""BatchNorm folding arithmetic: pure tensor functions, computed in float64 and cast back.

In eval mode BatchNorm is a per-channel affine, BN(x) = a ⊙ x + c with a = γ/√(σ²_run + ε) and
c = β − a ⊙ μ_run. It folds exactly into a linear neighbour:

- post position (producer → BN):  W' = diag(a)·W,  b' = a ⊙ b + c
- pre position  (BN → consumer):  W' = W·diag(a),  b' = b + W c

Weights follow PyTorch's layouts: Linear [out, in]; Conv [out, in/groups, k…]; ConvTranspose
[in, out/groups, k…] (so a transposed producer's output channels lie along dim 1, per group).
"""

from __future__ import annotations

import torch

from convert.rewrites.math import fold_affine_into_linear


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as (scale a, shift c) in float64; γ = 1 and β = 0 when affine=False."""
    mean = running_mean.double()
    scale = torch.rsqrt(running_var.double() + eps)  # [C]
    if gamma is not None:
        scale = scale * gamma.double()
    shift = -scale * mean  # [C]
    if beta is not None:
        shift = shift + beta.double()
    return scale, shift


def _output_channel_scale(
    scale: torch.Tensor, weight: torch.Tensor, transposed: bool, groups: int
) -> torch.Tensor:
    """`scale` (one entry per output channel) shaped to broadcast against `weight`."""
    trailing = (1,) * (weight.dim() - 2)
    if not transposed:
        return scale.view(-1, 1, *trailing)  # [out, 1, 1…]
    # ConvTranspose weight [in, out/groups, k…]: row i belongs to group i // (in/groups), whose
    # output channels are scale[g*out_per_group : (g+1)*out_per_group].
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    per_group = scale.view(groups, out_per_group)  # [groups, out/groups]
    per_row = per_group.repeat_interleave(in_channels // groups, dim=0)  # [in, out/groups]
    return per_row.view(in_channels, out_per_group, *trailing)


def _input_channel_scale(scale: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """`scale` (one entry per input channel) shaped to broadcast against a Linear/Conv `weight`."""
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    # output channel o reads the input channels of its group g = o // (out/groups)
    per_group = scale.view(groups, in_per_group)  # [groups, in/groups]
    per_row = per_group.repeat_interleave(out_channels // groups, dim=0)  # [out, in/groups]
    return per_row.view(out_channels, in_per_group, *(1,) * (weight.dim() - 2))


def fold_affine_into_producer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') such that a ⊙ (layer(x; W, b)) + c == layer(x; W', b'), for Linear, Conv or ConvTranspose."""
    w = weight.double()
    w_new = w * _output_channel_scale(scale.double(), w, transposed, groups)
    b = torch.zeros_like(scale, dtype=torch.float64) if bias is None else bias.double()
    b_new = scale.double() * b + shift.double()
    return w_new.to(weight.dtype), b_new.to(weight.dtype if bias is None else bias.dtype)


def fold_affine_into_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') such that layer(a ⊙ x + c; W, b) == layer(x; W', b'), for Linear or an unpadded Conv.

    Exact for a Conv only when every output position reads a full window of real inputs (no zero
    padding): a padded zero would have been c before the fold and is 0 after it. The arithmetic is the
    norms' affine fold (`convert.rewrites.math.fold_affine_into_linear`); a bias is always returned.
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return fold_affine_into_linear(weight, bias, scale, shift, groups=groups)


def fold_conv_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BatchNorm that reads this Linear/Conv/ConvTranspose's output (post position)."""
    scale, shift = bn_affine(running_mean, running_var, eps, gamma, beta)
    return fold_affine_into_producer(weight, bias, scale, shift, transposed=transposed, groups=groups)


def fold_bn_conv_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BatchNorm whose output this Linear/unpadded Conv reads (pre position)."""
    scale, shift = bn_affine(running_mean, running_var, eps, gamma, beta)
    return fold_affine_into_consumer(weight, bias, scale, shift, groups=groups)
