"""The pipeline parks the source model's weights in a file between rewrites and gives them back intact."""

import copy

import numpy as np
import pytest
import torch

from convert import default_pick, memory
from convert.memory import ParkedWeights
from convert.models import Source
from convert.pipeline import ConvertOptions, convert
from convert.rewrites import math
from engines.manifest import TensorInfo
from tests.convert._models_a import VOCAB, gpt2


def test_parked_weights_come_back_the_same_and_still_tied(monkeypatch):
    monkeypatch.setattr(memory, "PARK_MIN_BYTES", 0)
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
    monkeypatch.setattr(memory, "PARK_MIN_BYTES", 0)
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


# ------------------------------------------------------------------ large weights in float64 blocks


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_large_weights_are_computed_in_blocks_with_the_same_values(monkeypatch, layout):
    """A weight over CHUNK_VALUES is computed a block of outputs at a time; every value matches the
    whole-matrix computation (the element-wise steps bit for bit, the β products to float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 11, generator=g) if layout == "out_in" else torch.randn(11, 37, generator=g)
    b, gamma, beta = torch.randn(37, generator=g), torch.rand(11, generator=g) + 0.5, torch.randn(11, generator=g)
    table = torch.randn(37, 11, generator=g)
    whole = (math.fold_affine_into_linear(w, b, gamma, beta, layout), math.compress_readers(w, layout, 3),
             math.center_along(table, -1))
    monkeypatch.setattr(math, "CHUNK_VALUES", 40)  # blocks of 3 or 4 outputs
    assert len(math.spans(w, 0 if layout == "out_in" else 1)) > 5
    (fw, fb), reader, centred = (math.fold_affine_into_linear(w, b, gamma, beta, layout),
                                 math.compress_readers(w, layout, 3), math.center_along(table, -1))
    assert torch.equal(fw, whole[0][0]) and torch.equal(reader, whole[1]) and torch.equal(centred, whole[2])
    torch.testing.assert_close(fb, whole[0][1], rtol=0, atol=1e-6)
    assert fw.dtype == reader.dtype == centred.dtype == torch.float32


def test_spans_cover_the_axis_once():
    t = torch.zeros(50257, 768)
    covered = [i for start, length in math.spans(t, 0) for i in range(start, start + length)]
    assert covered == list(range(50257))
    assert all(length * 768 <= math.CHUNK_VALUES for _, length in math.spans(t, 0))
    assert math.spans(torch.zeros(4, 3), 0) == [(0, 4)]


# ------------------------------------------------------------------ benchmark sessions


def _identity_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("limit", "opened", "open_at_end"), [(None, 2, 2), (0, 3, 1)])
def test_benchmark_sessions_of_large_models_are_open_one_at_a_time(tmp_path, monkeypatch, limit, opened,
                                                                   open_at_end):
    if limit is not None:
        monkeypatch.setattr(default_pick, "BOTH_SESSIONS_MAX_BYTES", limit)
    pair = default_pick.Sessions(_identity_onnx(tmp_path / "a.onnx"), _identity_onnx(tmp_path / "b.onnx"), threads=1)
    x = np.ones((2, 3), dtype=np.float32)
    for name in ("unfused", "v", "v", "unfused"):  # the A B B A order of two benchmark rounds
        np.testing.assert_array_equal(pair.get(name).run(None, {"x": x})[0], x)
    assert pair.opened == opened and len(pair.open) == open_at_end
    pair.close()
    assert not pair.open


# ------------------------------------------------------------------ onnx.checker without the weights in memory


def _matmul_onnx(path, rows):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 20])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 20])
    w = numpy_helper.from_array(np.arange(rows * 20, dtype=np.float32).reshape(rows, 20), "w")  # > 1 KB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_checker_sees_initializer_shapes_and_leaves_no_files(tmp_path):
    from convert.export import ExportError, _without_weights, check_onnx

    good = _matmul_onnx(tmp_path / "good.onnx", 20)
    assert check_onnx(good) == good
    skeleton = _without_weights(good, good.name)
    assert len(skeleton) < 1600 < good.stat().st_size  # the weight's 1600 bytes stay in the file
    bad = _matmul_onnx(tmp_path / "bad.onnx", 7)  # [N, 20] @ [7, 20]: shape inference must reject it
    with pytest.raises(ExportError, match="onnx.checker rejected"):
        check_onnx(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx"]


def test_shedding_the_mapped_pages_keeps_the_values(monkeypatch):
    monkeypatch.setattr(memory, "PARK_MIN_BYTES", 0)
    model = gpt2()
    before = copy.deepcopy(model.state_dict())
    weights = ParkedWeights(model)
    weights.park()
    weights.restore()
    with weights.shedding(every=0.001):
        for _ in range(3):
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights.shed()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights.close()
    weights.shed()  # restored into memory: nothing mapped, nothing to do
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
