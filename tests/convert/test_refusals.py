"""Regression tests: the cases where a rewrite used to be silently wrong or crash must refuse with a reason
(or be exact), through the public `rewrite()`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convert.rewrites import NotApplicable, rewrite
from convert.verify import verify

C, L = 8, 6


class ConvStream(nn.Module):
    """Pre-LN over channels of a [B, C, L] stream; each block writes it through `make_writer`."""

    def __init__(self, make_writer, depth: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, C)
        self.norms = nn.ModuleList(nn.LayerNorm(C) for _ in range(depth))
        self.writers = nn.ModuleList(make_writer() for _ in range(depth))
        self.final = nn.LayerNorm(C)
        self.head = nn.Linear(C, 2)
        for norm in [*self.norms, self.final]:
            nn.init.normal_(norm.weight, 1, 0.3)
            nn.init.normal_(norm.bias, 0, 0.3)

    def example_inputs(self):
        return {"x": torch.randn(2, L, 3, generator=torch.Generator().manual_seed(1))}

    def forward(self, x):
        h = self.embed(x).transpose(1, 2)  # [B, C, L]
        for norm, writer in zip(self.norms, self.writers, strict=True):
            h = h + writer(norm(h.transpose(1, 2)).transpose(1, 2))
        return self.head(self.final(h.transpose(1, 2)))


def test_a_depthwise_conv_writer_is_refused_not_returned_wrong():
    model = ConvStream(lambda: nn.Conv1d(C, C, 3, padding=1, groups=C)).eval()
    with pytest.raises(NotApplicable, match="grouped convolution"):
        rewrite(model, "rmsnorm")


def test_a_transposed_conv_writer_is_refused():
    model = ConvStream(lambda: nn.ConvTranspose1d(C, C, 3, padding=1)).eval()
    with pytest.raises(NotApplicable, match="transposed convolution"):
        rewrite(model, "rmsnorm")


def test_an_ungrouped_conv_writer_is_centred_exactly():
    model = ConvStream(lambda: nn.Conv1d(C, C, 3, padding=1)).eval()
    rewritten = rewrite(model.double(), "rmsnorm")
    assert verify(model, rewritten, model.example_inputs(), dtype="float64")


class NoBiasSlot(nn.Module):
    """A linear layer whose forward reads no bias (and has no slot for one)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class PreLN(nn.Module):
    def __init__(self, reader=nn.Linear, writer_reads_stream=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, C)
        self.norm = nn.LayerNorm(C)
        self.fc = reader(C, C)
        self.extra = nn.Linear(C, C) if writer_reads_stream else None
        self.final = nn.LayerNorm(C)
        self.head = nn.Linear(C, 2)
        for norm in (self.norm, self.final):
            nn.init.normal_(norm.weight, 1, 0.3)
            nn.init.normal_(norm.bias, 0, 0.3)

    def example_inputs(self):
        return {"x": torch.randn(2, L, 3, generator=torch.Generator().manual_seed(1))}

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc(self.norm(h))
        if self.extra is not None:
            h = h + self.extra(h)  # reads the stream directly: the stream is not read only by norms
        return self.head(self.final(h))


def test_a_reader_without_a_bias_slot_keeps_its_norm_and_stays_exact():
    model = PreLN(reader=NoBiasSlot).eval()
    for variant in ("affine", "rmsnorm"):
        rewritten = rewrite(model.double(), variant)  # the other norm (final → head) still folds
        assert verify(model, rewritten, model.example_inputs(), dtype="float64"), variant
        assert not any(name.endswith("fc.bias") for name, _ in rewritten.named_parameters())


def test_a_reader_without_a_bias_slot_is_named_when_nothing_else_folds():
    class Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(C), NoBiasSlot(C, 2)
            nn.init.normal_(self.norm.bias, 0, 0.3)

        def forward(self, x):
            return self.fc(self.norm(x))

    with pytest.raises(NotApplicable, match="fc has no bias that its forward reads"):
        rewrite(Only().eval(), "affine", inputs={"x": torch.randn(2, C)})


def test_a_writer_that_also_reads_the_stream_is_refused():
    model = PreLN(writer_reads_stream=True).eval()
    with pytest.raises(NotApplicable, match="reads the residual stream|reads it"):
        rewrite(model, "rmsnorm")


def test_a_multi_axis_layernorm_is_refused_with_its_reason():
    class TwoAxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm((4, C)), nn.Linear(C, 2)

        def forward(self, x):
            return self.fc(self.norm(x))

    with pytest.raises(NotApplicable, match=r"normalizes over 2 axes"):
        rewrite(TwoAxes().eval(), "affine", inputs={"x": torch.randn(2, 4, C)})


class EpsOutsideRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(C) + 0.5), 1e-3

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def test_a_norm_with_eps_outside_the_root_is_recognised_and_refused():
    model = nn.Sequential(EpsOutsideRMSNorm(), nn.Linear(C, 2)).eval()
    with pytest.raises(NotApplicable, match="EpsOutsideRMSNorm does not compute"):
        rewrite(model, "affine", inputs={"input": torch.randn(2, C)})


def test_an_unexpected_error_inside_a_rewrite_becomes_not_applicable(monkeypatch):
    import convert.rewrites.affine as affine

    def broken(model, use):
        raise RuntimeError("permute(sparse_coo): number of dimensions in the tensor input does not match")

    monkeypatch.setattr(affine, "fold_norm_into_readers", broken)
    with pytest.raises(NotApplicable, match="affine cannot be applied to PreLN: RuntimeError: permute"):
        rewrite(PreLN().eval(), "affine")


def test_the_float64_check_refuses_a_wrong_result(monkeypatch):
    import convert.rewrites.pre_rmsnorm as pre_rmsnorm

    def off_by_a_bit(w, b, layout="out_in"):
        return w * 1.001, b

    monkeypatch.setattr(pre_rmsnorm, "center_output_rows", off_by_a_bit)
    with pytest.raises(NotApplicable, match="not the same function"):
        rewrite(PreLN().eval(), "rmsnorm")
    assert rewrite(PreLN().eval(), "rmsnorm", check=False) is not None  # the opt-out returns it unchecked
