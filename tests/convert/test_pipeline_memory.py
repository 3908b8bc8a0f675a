"""The pipeline parks the source model's weights in a file between rewrites and gives them back intact."""

import copy

import numpy as np
import torch

from convert import pipeline
from convert.models import Source
from convert.pipeline import ConvertOptions, ParkedWeights, convert
from engines.manifest import TensorInfo
from tests.convert._models_a import VOCAB, gpt2


def test_parked_weights_come_back_the_same_and_still_tied(monkeypatch):
    monkeypatch.setattr(pipeline, "PARK_MIN_BYTES", 0)
    model = gpt2()
    before = copy.deepcopy(model.state_dict())
    weights = ParkedWeights(model)
    weights.park()
    assert weights.path.exists() and model.transformer.h[0].mlp.c_fc.weight.numel() == 0
    weights.restore()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights.park()
    path = weights.path
    weights.close()
    assert not path.exists() and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_small_models_are_not_parked():
    weights = ParkedWeights(gpt2())
    weights.park()
    assert not weights.parked and weights.path is None


def test_a_conversion_with_parking_leaves_the_source_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PARK_MIN_BYTES", 0)
    model = gpt2()

    class Wrapped(torch.nn.Module):  # keyword input_ids -> logits
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapped = Wrapped().eval()
    before = copy.deepcopy(wrapped.state_dict())

    def sample(n):
        ids = np.random.default_rng(5).integers(0, VOCAB, size=(n, 8), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    source = Source(name="tiny", description="", model=wrapped, task="causal-lm", sample_inputs=sample,
                    inputs=[TensorInfo(name=name, datatype="INT64", shape=[-1, -1])
                            for name in ("input_ids", "attention_mask")],
                    outputs=[TensorInfo(name="logits", datatype="FP32", shape=[-1, -1, VOCAB])])
    options = ConvertOptions(variants=["affine", "rmsnorm", "crmsnorm"], progress=False, benchmark=False,
                             torch_artifacts=False, samples=4)
    manifest = convert(source, "tiny", tmp_path, options)
    assert manifest.not_applicable == {}
    assert all(info.servable for info in manifest.variants.values())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())
