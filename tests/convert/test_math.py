"""The rewrite arithmetic as pure functions: folding, centring, CRMS compression, and the new norms."""

import pytest
import torch
from torch import nn

from convert.modules import Center, CRMSNorm, RMSNorm
from convert.rewrites.math import (
    IN_OUT,
    OUT_IN,
    center_along,
    center_embedding_rows,
    center_output_rows,
    compress_readers,
    compress_writer,
    drop_along,
    fold_affine_into_linear,
    scale_output_rows,
)

D, OUT = 6, 5


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def linear(w, b, u, layout):
    y = u @ w.T if layout == OUT_IN else u @ w
    return y if b is None else y + b


def layout_weight(g, layout, dtype=torch.float64):
    w = torch.randn(OUT, D, generator=g, dtype=dtype)
    return w if layout == OUT_IN else w.T.contiguous()


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_affine_into_linear_computes_the_same_function(g, layout, with_bias):
    w = layout_weight(g, layout)
    b = torch.randn(OUT, generator=g, dtype=torch.float64) if with_bias else None
    gamma, beta = 1 + torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    u = torch.randn(3, D, generator=g, dtype=torch.float64)
    new_w, new_b = fold_affine_into_linear(w, b, gamma, beta, layout)
    assert new_b is not None and new_b.shape == (OUT,)  # a bias is created where missing
    torch.testing.assert_close(linear(new_w, new_b, u, layout), linear(w, b, gamma * u + beta, layout), rtol=1e-12, atol=1e-12)


def test_fold_without_beta_keeps_a_missing_bias_missing_and_casts_back_once(g):
    w = torch.randn(OUT, D, generator=g, dtype=torch.float16)
    gamma = 1 + torch.randn(D, generator=g)
    new_w, new_b = fold_affine_into_linear(w, None, gamma, None)
    assert new_b is None and new_w.dtype == torch.float16
    # rounded once from the float64 product, not accumulated in float16
    assert torch.equal(new_w, (w.double() * gamma.double()).to(torch.float16))


def test_fold_rejects_an_unknown_layout(g):
    with pytest.raises(ValueError, match="layout"):
        fold_affine_into_linear(torch.ones(2, 2), None, None, None, "columns")


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
def test_centred_writer_outputs_are_zero_mean_and_layernorm_cannot_tell(g, layout):
    w, b = layout_weight(g, layout), torch.randn(OUT, generator=g, dtype=torch.float64) + 3
    u = torch.randn(4, D, generator=g, dtype=torch.float64)
    new_w, new_b = center_output_rows(w, b, layout)
    y, new_y = linear(w, b, u, layout), linear(new_w, new_b, u, layout)
    torch.testing.assert_close(new_y.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(new_y, y - y.mean(-1, keepdim=True), atol=1e-12, rtol=0)
    ln = nn.LayerNorm(OUT).double()
    torch.testing.assert_close(ln(new_y), ln(y), atol=1e-12, rtol=0)


def test_centring_a_conv_weight_centres_its_output_channels(g):
    w, b = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    new_w, new_b = center_output_rows(w, b, OUT_IN)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, new_w, new_b)
    torch.testing.assert_close(y.mean(1), torch.zeros_like(y.mean(1)), atol=1e-12, rtol=0)


def test_centring_tables_and_tensors(g):
    table = torch.randn(10, D, generator=g) + 2
    assert center_embedding_rows(table).double().mean(-1).abs().max() < 1e-6
    cls = torch.randn(1, 1, D, generator=g, dtype=torch.float64) + 1
    assert center_along(cls, 2).mean(-1).abs().max() < 1e-15


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
@pytest.mark.parametrize("index", [-1, 2])
def test_compressed_reader_reads_the_zero_mean_vector_without_one_entry(g, layout, index):
    w = layout_weight(g, layout)  # reads D inputs, writes OUT outputs
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    compressed = compress_readers(w, layout, index)
    assert compressed.shape == ((OUT, D - 1) if layout == OUT_IN else (D - 1, OUT))
    kept = drop_along(x, 1, index)
    torch.testing.assert_close(linear(compressed, None, kept, layout), linear(w, None, x, layout), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
def test_compressed_writer_drops_one_output(g, layout):
    w, b = layout_weight(g, layout), torch.randn(OUT, generator=g, dtype=torch.float64)
    u = torch.randn(2, D, generator=g, dtype=torch.float64)
    new_w, new_b = compress_writer(w, b, layout)
    torch.testing.assert_close(linear(new_w, new_b, u, layout), linear(w, b, u, layout)[:, :-1], atol=1e-12, rtol=0)
    new_w, new_b = compress_writer(w, b, layout, index=1)
    want = linear(w, b, u, layout)[:, [0, 2, 3, 4]]
    torch.testing.assert_close(linear(new_w, new_b, u, layout), want, atol=1e-12, rtol=0)
    assert drop_along(torch.zeros(2, 7, 3), 1).shape == (2, 6, 3)


def test_layernorm_of_a_zero_mean_vector_is_rmsnorm_with_the_same_eps(g):
    x = torch.randn(4, 3, D, generator=g, dtype=torch.float64) * 0.01  # small RMS: ε matters
    x = Center()(x)
    ln, rms = nn.LayerNorm(D, eps=1e-5, elementwise_affine=False).double(), RMSNorm(D, eps=1e-5).double()
    torch.testing.assert_close(rms(x), ln(x), atol=1e-13, rtol=0)
    assert not torch.allclose(RMSNorm(D, eps=1e-12).double()(x), ln(x), atol=1e-6)  # a different ε is not exact


def test_crmsnorm_divides_by_the_full_width(g):
    x = Center()(torch.randn(5, D, generator=g, dtype=torch.float64))
    crms, rms = CRMSNorm(D, eps=1e-5).double(), RMSNorm(D, eps=1e-5).double()
    torch.testing.assert_close(crms(x[:, :-1]), rms(x)[:, :-1], atol=1e-13, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_keeps_the_input_dtype_and_computes_statistics_in_float32(dtype):
    x = torch.full((2, D), 300.0).to(dtype)  # x² = 90,000 overflows float16
    x[:, ::2] = -300.0
    y = RMSNorm(D, eps=1e-5).to(dtype)(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float().abs(), torch.ones(2, D), atol=1e-2, rtol=0)


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
def test_a_per_channel_output_scale_folds_into_the_linear(g, layout):
    w, b = layout_weight(g, layout), torch.randn(OUT, generator=g, dtype=torch.float64)
    scale = torch.randn(OUT, generator=g, dtype=torch.float64)
    u = torch.randn(3, D, generator=g, dtype=torch.float64)
    new_w, new_b = scale_output_rows(w, b, scale, layout)
    torch.testing.assert_close(linear(new_w, new_b, u, layout), scale * linear(w, b, u, layout), atol=1e-12, rtol=0)
