"""rewrite()'s own check never crashes: a model that cannot run in float64 is checked in float32 at the float32
gate (and says so), and a model that does not run on its inputs is a usage error before any rewrite."""

import logging

import pytest
import torch
from torch import nn

from convert.rewrites import ModelDoesNotRun, NotApplicable, rewrite
from convert.rewrites.check import FLOAT32_NORMS_GATE, checked_copy
from tests.convert import _hf_families as hf


class Float32Kernel(nn.Module):
    """Stands for a kernel without a float64 version (transformers' grouped-matmul experts on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
        return x


class PreLN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.kernel, self.fc = nn.LayerNorm(width), Float32Kernel(), nn.Linear(width, width)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.kernel(self.norm(x)))


def inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(1))}


def test_a_model_that_cannot_run_in_float64_gets_a_float32_gated_check(caplog):
    model = PreLN().eval()
    with caplog.at_level(logging.INFO, logger="convert.rewrites.check"):
        rewritten = rewrite(model, "affine", inputs=inputs())
    assert torch.equal(rewritten.norm.weight, torch.ones(8))  # folded, not refused
    check = next(r.getMessage() for r in caplog.records if "check" in r.getMessage())
    assert "float32 check passed" in check and "PreLN does not run in float64" in check, check
    with torch.no_grad():
        assert torch.allclose(rewritten(**inputs(4)), model(**inputs(4)), atol=1e-5)


def test_the_float32_check_still_refuses_a_wrong_rewrite(monkeypatch):
    import convert.rewrites.writer as writer

    fold = writer.fold_affine_into_linear

    def off_by_one_percent(*args, **kwargs):
        weight, bias = fold(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(writer, "fold_affine_into_linear", off_by_one_percent)
    with pytest.raises(NotApplicable, match=rf"float32 rel-L2 .* > {FLOAT32_NORMS_GATE:g}"):
        rewrite(PreLN().eval(), "affine", inputs=inputs())


def test_a_transformers_moe_is_checked_in_float32_with_the_reason():
    model, given = hf.mixtral()
    copy, why = checked_copy(model, given)
    assert copy.dtype == torch.float32 and "MixtralForCausalLM does not run in float64" in why
    float64, why = checked_copy(hf.llama()[0], hf.text())
    assert float64.dtype == torch.float64 and why is None


def test_a_model_that_does_not_run_on_its_inputs_is_a_usage_error_before_any_rewrite(monkeypatch):
    import convert.rewrites.affine as affine

    called = []
    monkeypatch.setattr(affine, "fold_affine", lambda model, inputs=None: called.append(model))
    wrong = {"x": torch.randn(2, 5, 6)}  # 6 channels for a model 8 wide
    with pytest.raises(ModelDoesNotRun, match=r"PreLN does not run on its example inputs \(x \(2, 5, 6\) float32\)"):
        rewrite(PreLN().eval(), "affine", inputs=wrong)
    assert not called
    assert not issubclass(ModelDoesNotRun, NotApplicable)  # a usage error, not a refusal of the variant
