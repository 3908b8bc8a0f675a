"""export_onnx writes the weights one tensor at a time: the file is the same model the exporter writes whole."""

import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from convert.export import _Positional, as_tensors, dynamic_axes, export_onnx, ort_session
from engines.manifest import TensorInfo
from tests.convert._models_a import VOCAB, gpt2

INPUTS = [TensorInfo(name="input_ids", datatype="INT64", shape=[-1, -1])]
OUTPUTS = [TensorInfo(name="logits", datatype="FP32", shape=[-1, -1, VOCAB])]


def ids(n, length):
    return {"input_ids": np.random.default_rng(0).integers(0, VOCAB, size=(n, length), dtype=np.int64)}


def whole(model, example, path):
    """The exporter's own one-piece file, with the same settings."""
    wrapped = _Positional(model, ["input_ids"], 1).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, as_tensors(example, INPUTS), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes=dynamic_axes(INPUTS) | dynamic_axes(OUTPUTS))
    return onnx.load(str(path))


def test_streamed_file_is_the_exporters_model(tmp_path):
    model = gpt2().eval()  # tied embedding/head: one initializer for both
    streamed = onnx.load(str(export_onnx(model, ids(2, 5), tmp_path / "s.onnx", inputs=INPUTS, outputs=OUTPUTS)))
    reference = whole(model, ids(2, 5), tmp_path / "w.onnx")
    assert [i.name for i in streamed.graph.input] == ["input_ids"]
    assert [(n.op_type, list(n.input)) for n in streamed.graph.node] == \
        [(n.op_type, list(n.input)) for n in reference.graph.node]
    got = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert got.keys() == want.keys() and len(got) > 10
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    # and ONNX Runtime computes the torch model's function with it, on a longer sequence than exported
    data = ids(3, 9)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(data["input_ids"])).logits.numpy()
    (out,) = ort_session(tmp_path / "s.onnx").run(None, data)
    assert np.abs(out - expected).max() < 1e-4


def test_half_precision_weights_are_written_as_they_are(tmp_path):
    model = gpt2().eval().half()
    path = export_onnx(model, ids(2, 5), tmp_path / "h.onnx", inputs=INPUTS,
                       outputs=[TensorInfo(name="logits", datatype="FP16", shape=[-1, -1, VOCAB])])
    initializers = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    weight = initializers["model.transformer.wpe.weight"]
    assert weight.data_type == onnx.TensorProto.FLOAT16
    assert np.array_equal(numpy_helper.to_array(weight), model.transformer.wpe.weight.detach().numpy())
