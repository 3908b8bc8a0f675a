"""`smoothed`: the SmoothQuant/RepQ-ViT reparameterization is exact (fp64) on every family the rewrites cover,
shrinks the outlier channels it is for, and refuses (or skips a norm) with a reason where it cannot apply."""

import copy

import pytest
import torch

from convert.rewrites import NotApplicable, rewrite
from convert.rewrites.math import IN_OUT, OUT_IN
from convert.rewrites.smooth import (
    divide_norm_affine,
    repq_scales,
    scale_input_columns,
    smooth,
    smoothquant_scales,
)
from tests.convert import _models_a as models
from tests.convert._models_a import rel_l2
from tests.convert.test_families import FAMILIES, Wrapped, text_inputs


def test_scale_math_is_the_identity_it_claims():
    g = torch.Generator().manual_seed(0)
    x_hat, gamma, beta = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g), torch.randn(6)
    w, s = torch.randn(4, 6, generator=g), torch.rand(6, generator=g, dtype=torch.float64) * 10 + 0.1
    new_gamma, new_beta = divide_norm_affine(gamma.double(), beta.double(), s)
    want = (gamma * x_hat + beta) @ w.double().T
    got = (new_gamma * x_hat + new_beta) @ scale_input_columns(w.double(), s, OUT_IN).T
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(scale_input_columns(w.double().T, s, IN_OUT), scale_input_columns(w.double(), s).T)


def test_smoothquant_formula_and_dead_channels():
    act, weight = torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.0])
    s = smoothquant_scales(act, weight, 0.5)
    assert s[0].item() == pytest.approx(2.0) and s[1].item() == 1.0 and s[2].item() == 1.0
    assert smoothquant_scales(act, weight, 1.0)[0].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(act, weight, 1.5)
    assert torch.allclose(repq_scales(torch.tensor([-1.0, -3.0]), torch.tensor([1.0, 3.0])),
                          torch.tensor([0.5, 1.5], dtype=torch.float64))


def check_smoothed(original, inputs, output, method="smoothquant"):
    for dtype, gate in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = copy.deepcopy(original).to(dtype)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        new = smooth(copy.deepcopy(model), calibration=[cast], method=method)  # traced with its own example
        with torch.no_grad():
            assert rel_l2(output(new(**cast)), output(model(**cast))) <= gate, (dtype, method)
    return new


@pytest.mark.parametrize("family", list(FAMILIES))
def test_smoothed_is_exact_on_each_family(family):
    build, make_inputs, output = FAMILIES[family]
    new = check_smoothed(build(), make_inputs(), output)
    assert new.normfuse_smoothing.applied, "some norm must have been smoothed"


@pytest.mark.parametrize("method", ["smoothquant", "repq"])
def test_smoothed_is_exact_on_llama_rmsnorm_and_tiny_vit(method):
    check_smoothed(Wrapped(models.llama()), text_inputs(), lambda y: y, method)
    vit = models.TinyViT()
    check_smoothed(vit, vit.example_inputs(), lambda y: y, method)


def test_rewrite_entry_point_leaves_its_input_untouched():
    model = models.TinyViT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = rewrite(model, "smoothed")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(new.norm.weight, model.norm.weight)


def test_smoothing_flattens_outlier_channels():
    """A norm output with a 50x channel: after smoothing (α=0.5) that channel's range shrinks by ~√50."""
    model = models.TinyViT()
    with torch.no_grad():
        model.blocks[0].norm1.weight[3] *= 50
    inputs = model.example_inputs()
    ratio = {}
    for name, m in (("before", model), ("after", smooth(copy.deepcopy(model), inputs))):
        out = m.blocks[0].norm1(m.patch(inputs["x"])).abs().amax((0, 1))
        ratio[name] = (out.max() / out.median()).item()
    assert ratio["after"] < ratio["before"] / 4


def test_post_ln_norms_are_skipped_with_the_reason():
    """BERT is Post-LN: every norm's output is also the residual stream, so nothing can be smoothed."""
    with pytest.raises(NotApplicable, match="no norm is read only by linear layers"):
        rewrite(models.bert(), "smoothed")
    mixed = models.TinyViT(post_ln=1, depth=2)  # a Post-LN block, then a Pre-LN one
    new = smooth(copy.deepcopy(mixed), mixed.example_inputs())
    report = new.normfuse_smoothing
    assert "blocks.1.norm1" in report.applied and "norm" in report.applied
    assert any("add" in why or "residual" in why or "not by a linear" in why for why in report.skipped.values())


def test_a_norm_read_through_a_nonlinearity_is_refused():
    with pytest.raises(NotApplicable, match="gelu"):
        rewrite(models.NormThenGelu(), "smoothed")


def test_unknown_method_and_alpha_are_usage_errors():
    model = models.TinyViT()
    with pytest.raises(ValueError, match="method"):
        smooth(model, model.example_inputs(), method="magic")
    with pytest.raises(ValueError, match="alpha"):
        smooth(model, model.example_inputs(), alpha=-0.1)


def test_outlier_injection_is_function_preserving_and_makes_outliers():
    from convert.rewrites.smooth import inject_outliers

    model = models.TinyViT().double()
    inputs = {k: v.double() for k, v in model.example_inputs().items()}
    stressed = inject_outliers(copy.deepcopy(model), inputs, channels=(3,), factor=100.0)
    with torch.no_grad():
        assert rel_l2(stressed(**inputs), model(**inputs)) <= 1e-10
        assert stressed.norm.weight[3].abs() == pytest.approx(100 * model.norm.weight[3].abs().item())


@pytest.mark.parametrize("family", ["gemma", "qwen2", "bloom", "falcon", "swin", "convnext"])
def test_smoothed_on_more_families_is_exact_or_refused_with_a_reason(family):
    """Gemma's x̂·(1+w) carries the scale in (1+w); channels-first norms (ConvNeXt) are skipped, with the reason."""
    from tests.convert._hf_families import FAMILIES as HF

    model, inputs = HF[family]()
    model = model.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    try:
        new = smooth(copy.deepcopy(model), calibration=[inputs])
    except NotApplicable as refusal:
        assert str(refusal).strip()
        return
    def first(out):
        return (out.logits if hasattr(out, "logits") else out[0])
    with torch.no_grad():
        gate = 1e-6 if family == "gemma" else 1e-10  # GemmaRMSNorm computes in float32 whatever the model's dtype
        assert rel_l2(first(new(**inputs)), first(model(**inputs))) <= gate, family
    assert new.normfuse_smoothing.applied
    assert all(why.strip() for why in new.normfuse_smoothing.skipped.values())


def test_post_ln_bert_gets_explicit_scales_on_its_readers_and_stays_exact():
    """BERT's norms feed the residual too: with post_ln_scale their readers read u/s (InputScaled), exactly."""
    from convert.rewrites.smooth import InputScaled

    model = models.bert().double()
    inputs = {"input_ids": torch.randint(0, models.VOCAB, (3, models.SEQ), generator=torch.Generator().manual_seed(2))}
    new = smooth(copy.deepcopy(model), calibration=[inputs], post_ln_scale=True)
    report = new.normfuse_smoothing
    assert report.scaled and not report.applied
    assert sum(isinstance(m, InputScaled) for m in new.modules()) == sum(len(r) for r in report.scaled.values())
    with torch.no_grad():
        assert rel_l2(new(**inputs).last_hidden_state, model(**inputs).last_hidden_state) <= 1e-10
