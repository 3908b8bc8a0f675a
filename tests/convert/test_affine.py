"""`affine`: γ/β folded into the linear readers; norms kept with explicit ones/zeros."""

import copy

import pytest
import torch
from torch import nn

from convert.rewrites import NotApplicable, rewrite
from tests.convert._models_a import NormThenGelu, TinyViT, check_equivalence, low_precision_ratio


def inputs(model, batch=4):
    return {"x": torch.randn(batch, model.patches, model.patch_dim, generator=torch.Generator().manual_seed(1))}


def test_affine_is_folded_and_outputs_match():
    model = TinyViT().eval()
    before = copy.deepcopy(model.state_dict())
    folded = rewrite(model, "affine")
    norms = [m for m in folded.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5  # still LayerNorms, so the exporters emit LayerNormalization with γ/β inputs
    for norm in norms:
        assert norm.elementwise_affine and torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert folded.blocks[0].qkv.bias is not None  # β needed a bias the qkv layer did not have
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    check_equivalence(model, "affine", inputs(model))


def test_affine_refuses_a_norm_read_through_a_nonlinearity():
    with pytest.raises(NotApplicable, match=r"norm is read by .* through gelu.*not by a linear layer"):
        rewrite(NormThenGelu(), "affine")


def test_affine_leaves_post_ln_norms_and_folds_the_rest():
    model = TinyViT(post_ln=True)
    folded = rewrite(model, "affine")
    # the block norms write the residual stream (Post-LN); only the final norm, read by the head, folds
    assert torch.equal(folded.blocks[0].norm1.weight, model.blocks[0].norm1.weight)
    assert torch.equal(folded.norm.weight, torch.ones_like(folded.norm.weight))
    check_equivalence(model, "affine", inputs(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_in_low_precision_stays_within_twice_the_original_error(dtype):
    model = TinyViT()
    assert low_precision_ratio(model, "affine", dtype, inputs(model, batch=16)) <= 2.0
