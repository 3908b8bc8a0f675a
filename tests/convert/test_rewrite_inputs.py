"""`rewrite(model, variant, inputs=...)`: example inputs reach the graph-analysing rewrites (and only them),
so a model without `example_inputs()` can be rewritten, and the pipeline gives them from held-out data."""

import numpy as np
import pytest
import torch

from convert.models import Source
from convert.pipeline import ConvertOptions, convert
from convert.rewrites import REWRITES, NotApplicable, rewrite, takes_inputs
from engines.manifest import TensorInfo
from tests.convert._models_a import TinyViT, rel_l2


class NoExampleViT(TinyViT):
    """A Pre-LN model that cannot tell the analysis how to call it."""

    example_inputs = None


def batch(model, n=3, seed=1):
    return {"x": torch.randn(n, model.patches, model.patch_dim, generator=torch.Generator().manual_seed(seed))}


def test_only_the_analysing_rewrites_take_inputs():
    import importlib

    def function(variant):
        module, name = REWRITES[variant].split(":")
        return getattr(importlib.import_module(module), name)

    assert {v for v in REWRITES if takes_inputs(function(v))} == {"affine", "rmsnorm", "crmsnorm", "folded", "smoothed"}


@pytest.mark.parametrize("variant", ["affine", "rmsnorm", "crmsnorm"])
def test_inputs_are_passed_to_the_rewrite(variant):
    model = NoExampleViT().eval()
    with pytest.raises(NotApplicable, match="cannot build example inputs"):
        rewrite(model, variant)  # without inputs the analysis has nothing to trace with
    rewritten = rewrite(model, variant, inputs=batch(model, 2, seed=0))
    check = batch(model, 5, seed=7)  # other data than the tracing batch
    with torch.no_grad():
        assert rel_l2(rewritten(**check), model(**check)) <= 1e-5


def test_inputs_are_not_passed_to_a_rewrite_without_the_argument():
    model = NoExampleViT().eval()
    removed = rewrite(model, "nonorm", inputs=batch(model, 2))  # remove_norms(model) takes no inputs
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in removed.modules())


def test_the_pipeline_analyses_a_model_without_example_inputs(tmp_path):
    model = NoExampleViT().eval()
    shape = [-1, model.patches, model.patch_dim]

    def sample(n):
        return {"x": np.random.default_rng(3).standard_normal((n, *shape[1:]), dtype=np.float32)}

    source = Source(name="noexample", description="", model=model, task="test", sample_inputs=sample,
                    inputs=[TensorInfo(name="x", datatype="FP32", shape=shape)],
                    outputs=[TensorInfo(name="logits", datatype="FP32", shape=[-1, 5])])
    options = ConvertOptions(variants=["rmsnorm"], progress=False, benchmark=False, torch_artifacts=False, samples=4)
    manifest = convert(source, "noexample", tmp_path, options)
    assert manifest.not_applicable == {}
    assert manifest.variants["rmsnorm"].servable


@pytest.mark.parametrize("variant", ["affine", "rmsnorm", "crmsnorm", "nonorm"])
def test_shared_weights_leave_the_input_untouched(variant):
    import copy

    model = TinyViT().eval()
    before = copy.deepcopy(model.state_dict())
    shared = rewrite(model, variant, share_weights=True)
    copied = rewrite(model, variant)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = batch(model)
    with torch.no_grad():
        assert torch.equal(shared(**x), copied(**x))
    # the stream writers: re-centred (new tensors) by rmsnorm/crmsnorm, left alone (the same storage, in a
    # new Parameter so that `.data =` on one spares the other) by affine and nonorm
    new, old = shared.blocks[0].proj.weight, model.blocks[0].proj.weight
    assert new is not old
    assert (new.data_ptr() == old.data_ptr()) == (variant in ("affine", "nonorm"))


@pytest.mark.parametrize("variant", ["affine", "rmsnorm"])
def test_running_the_model_first_leaves_each_modules_mode_as_it_was(variant):
    """rewrite() runs the model once before rewriting (ModelDoesNotRun); it must not turn a submodule left in
    training mode to eval (that submodule is the rewrite's to refuse) nor the model's own mode."""
    model = TinyViT().train()
    model.blocks[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    rewrite(model, variant, inputs=batch(model, 2, seed=0))  # LayerNorm has no training-mode behaviour
    assert {name: m.training for name, m in model.named_modules()} == before
