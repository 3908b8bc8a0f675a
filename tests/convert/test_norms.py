"""UnifiedNorm and PowerNorm: statistics, smoothing, outlier filtration, running values, approximate backward
(against the papers' formulas written out here independently), and the eval forms that make them fold."""

from __future__ import annotations

import pytest
import torch

from convert.models.norms import GroupScaling, PowerNorm, UnifiedNorm

C = 8
EPS = 1e-5


def batch(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 5, C, generator=g, dtype=torch.float64) * scale).requires_grad_()


def m2(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, C).pow(2).mean(0)


def randomize_affine(norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        norm.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return norm


def un(**kw) -> UnifiedNorm:
    return randomize_affine(UnifiedNorm(C, **kw).double())


def pn(**kw) -> PowerNorm:
    return randomize_affine(PowerNorm(C, **kw).double())


# ----------------------------------------------------------------------------- UnifiedNorm forward

def test_un_first_step_uses_the_batch_second_moment_per_channel():
    norm, x = un(), batch(0)
    y = norm(x)
    expected = norm.weight * x / (m2(x) + EPS).sqrt() + norm.bias
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(norm.running_var, 0.9 * torch.ones(C, dtype=torch.float64) + 0.1 * m2(x))
    assert int(norm.iters) == 1


def test_un_statistics_skip_padding_tokens():
    norm, x = un(), batch(0)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[:, 3:] = True
    noisy = x.detach().clone()
    noisy[pad] = 1e3  # padding must not move the statistics
    y = norm(noisy, pad_mask=pad)
    real = x.detach()[~pad]
    expected = norm.weight * real / (real.pow(2).mean(0) + EPS).sqrt() + norm.bias
    torch.testing.assert_close(y[~pad], expected)


def test_un_fluctuation_smoothing_is_the_geometric_mean_of_the_window():
    norm = un(window_size=4, warmup_iters=0)
    xs = [batch(seed, scale=1 + seed) for seed in range(5)]
    for x in xs[:4]:
        norm(x)  # t ≤ K: each batch uses its own statistic
    y = norm(xs[4])
    gm = torch.stack([m2(x) for x in xs[1:]]).log().mean(0).exp()
    torch.testing.assert_close(y, norm.weight * xs[4] / (gm + EPS).sqrt() + norm.bias)
    assert not torch.allclose(gm, m2(xs[4]))


def test_un_outlier_filtration_skips_a_wild_batch():
    norm = un(window_size=4, warmup_iters=4, outlier_filtration=True)  # filtration from a full window
    for seed in range(6):
        norm(batch(seed))
    assert int(norm.skip_counter) == 0
    running_before = norm.running_var.clone()
    wild = batch(99, scale=30.0)
    y = norm(wild)
    assert int(norm.skip_counter) == 1
    # normalised with its own statistic, and its window slot holds the running statistic instead
    torch.testing.assert_close(y, norm.weight * wild / (m2(wild) + EPS).sqrt() + norm.bias)
    torch.testing.assert_close(norm.buffer_x2[int(norm.iters) % 4], running_before)


def test_un_without_filtration_absorbs_the_wild_batch_into_the_window():
    norm = un(window_size=4, warmup_iters=0, outlier_filtration=False)
    for seed in range(6):
        norm(batch(seed))
    norm(batch(99, scale=30.0))
    assert int(norm.skip_counter) == 0


def test_un_eval_form_is_a_fixed_per_channel_affine():
    norm = un()
    for seed in range(3):
        norm(batch(seed))
    norm.eval()
    x = batch(7).detach()
    expected = norm.weight * x / (norm.running_var + EPS).sqrt() + norm.bias
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x[:1]), expected[:1])  # no batch statistics: rows are independent


def test_norms_reject_non_token_tensors():
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        un()(torch.randn(4, C, dtype=torch.float64))


# ----------------------------------------------------------------------------- UnifiedNorm backward

def test_un_backward_without_smoothing_is_the_exact_gradient():
    # momentum 0, warm-up, no compensation: ψ is this batch's ⟨g·z⟩, and (g − ⟨g·z⟩ z)/σ is exact
    norm, x = un(momentum=0.0), batch(0)
    upstream = torch.randn(3, 5, C, dtype=torch.float64)
    (norm(x) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    y_ref = w_ref * x_ref / (x_ref.reshape(-1, C).pow(2).mean(0) + EPS).sqrt() + b_ref
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad)
    torch.testing.assert_close(norm.bias.grad, b_ref.grad)


def test_un_backward_with_compensation_and_smoothed_psi_follows_the_formula():
    norm = un(window_size=2, warmup_iters=0, compensation_warmup=0)
    for seed in range(4):
        x = batch(seed)
        norm(x).sum().backward()
    ema_before, buffer_before = norm.ema_gz.clone(), norm.buffer_gz.clone()
    running_before, window_x2 = norm.running_var.clone(), norm.buffer_x2.clone()
    x, upstream = batch(10), torch.randn(3, 5, C, dtype=torch.float64)
    (norm(x) * upstream).sum().backward()
    # the paper's formulas, step by step
    window_x2[int(norm.iters) % 2] = m2(x)
    var = window_x2.log().mean(0).exp()
    std = (var + EPS).sqrt()
    r = (std / (running_before + EPS).sqrt()).clamp(0.2, 5)
    z = x.detach() / std
    g = upstream * norm.weight.detach() * r
    buffer_before[int(norm.iters) % 2] = (g * z).reshape(-1, C).mean(0)
    psi = 0.9 * ema_before + 0.1 * buffer_before.mean(0)
    torch.testing.assert_close(norm.ema_gz, psi)
    torch.testing.assert_close(x.grad, (g - psi * z) / std)
    torch.testing.assert_close(norm.weight.grad.shape, torch.Size([C]))
    assert not torch.allclose(r, torch.ones_like(r))


# ----------------------------------------------------------------------------- PowerNorm

def test_group_scaling_divides_each_group_by_its_rms():
    x = torch.randn(2, 3, C, dtype=torch.float64)
    y = GroupScaling(group_num=2)(x)
    for group in (slice(0, 4), slice(4, 8)):
        rms = (x[..., group].pow(2).mean(-1, keepdim=True) + EPS).sqrt()
        torch.testing.assert_close(y[..., group], x[..., group] / rms)


def test_pn_warmup_forward_and_running_quadratic_mean():
    norm = pn(group_num=2, warmup_iters=3)
    phi = torch.ones(C, dtype=torch.float64)
    for t in (1, 2):
        x = batch(t)
        gs = norm.group_scaling(x.detach())
        y = norm(x)
        torch.testing.assert_close(y, norm.weight * gs / (m2(gs) + EPS).sqrt() + norm.bias)
        phi = phi * (t - 1) / t + m2(gs) / t          # cumulative average during warm-up ...
        phi = 0.9 * phi + 0.1 * m2(gs)                # ... then the EMA step, as the reference code does
        torch.testing.assert_close(norm.running_phi, phi)


def test_pn_after_warmup_normalises_with_the_running_value():
    norm = pn(group_num=2, warmup_iters=1)
    norm(batch(0))
    phi = norm.running_phi.clone()
    x = batch(1)
    gs = norm.group_scaling(x.detach())
    torch.testing.assert_close(norm(x), norm.weight * gs / (phi + EPS).sqrt() + norm.bias)
    torch.testing.assert_close(norm.running_phi, 0.9 * phi + 0.1 * m2(gs))


def test_pn_backward_follows_algorithm_1():
    norm = pn(group_num=1, warmup_iters=100)
    norm.group_scaling = torch.nn.Identity()  # isolate the PowerFunction from GS (exact autograd anyway)
    for seed in range(3):
        norm(batch(seed)).sum().backward()
    ema_before = norm.ema_gz.clone()
    norm.zero_grad()
    nu = 0.1 * ema_before
    x, upstream = batch(5), torch.randn(3, 5, C, dtype=torch.float64)
    (norm(x) * upstream).sum().backward()
    std = (m2(x) + EPS).sqrt()
    z = x.detach() / std
    g = upstream * norm.weight.detach()
    torch.testing.assert_close(x.grad, (g - nu * z) / std)
    gamma, lam = z.pow(2).reshape(-1, C).mean(0), (g * z).reshape(-1, C).mean(0)
    torch.testing.assert_close(0.1 * norm.ema_gz, nu * (1 - 0.1 * gamma) + 0.1 * lam)
    torch.testing.assert_close(norm.weight.grad, (upstream * z).reshape(-1, C).sum(0))
    assert not torch.allclose(nu, torch.zeros_like(nu))


def test_pn_eval_form_is_group_scaling_then_affine():
    norm = pn(group_num=4, warmup_iters=2)
    for seed in range(4):
        norm(batch(seed))
    norm.eval()
    x = batch(7).detach()
    gs = GroupScaling(4)(x)
    torch.testing.assert_close(norm(x), norm.weight * gs / (norm.running_phi + EPS).sqrt() + norm.bias)


def test_pn_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible"):
        PowerNorm(10, group_num=4)
