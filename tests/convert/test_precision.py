"""The FP16 precision-annotated ONNX: normalization stays FP32, parity vs FP32 within the recorded budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("onnxconverter_common", reason="FP16 conversion needs onnxconverter-common")

from convert.tensorrt.precision import fp32_compute_nodes, statistics_nodes, to_fp16, write_fp16_onnx

# Recorded FP16 budget against the FP32 graph on ORT CPU (tiny random block, activations up to ~300).
# Measured (ORT 1.32, 2026-11-23): rel-L2 1.7e-4, max |diff| / max |ref| 2.3e-4. Budget: ~10x headroom.
REL_L2_BUDGET = 2e-3
MAX_ABS_BUDGET = 3e-3  # relative to max |reference|


class HandRMSNorm(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class HandLayerNorm(torch.nn.Module):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)


class Block(torch.nn.Module):
    """A residual stream read by three kinds of norm: LayerNormalization, decomposed RMS, decomposed LN."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln, self.rms, self.hand_ln = torch.nn.LayerNorm(d), HandRMSNorm(d), HandLayerNorm()
        self.fc1, self.fc2, self.head = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, 4)

    def forward(self, x):
        h = x + self.fc1(self.ln(x))
        h = h + self.fc2(self.rms(h))
        return self.head(self.hand_ln(h))


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("precision") / "block.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        Block().eval(), (torch.randn(2, 5, 32),), str(path), input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: batch},), opset_version=18, external_data=True,
    )
    return path


def residual_with_outliers(n: int = 4) -> np.ndarray:
    """Activations like a trained residual stream: one channel near 300, where (x - mean)^2 overflows FP16."""
    x = np.random.default_rng(0).standard_normal((n, 5, 32)).astype(np.float32)
    x[..., 3] += 300.0
    return x


def run(path_or_model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    # ORT_ENABLE_ALL crashes in NchwcTransformer on FP16 graphs (tensorrt.md §0.4)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def within_budget(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    rel_l2 = float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))
    max_abs = float(np.abs(candidate - reference).max() / np.abs(reference).max())
    return rel_l2, max_abs


def test_statistics_of_every_decomposed_norm_are_found(fp32_path):
    model = onnx.load(str(fp32_path))
    by_name = {n.name: n.op_type for n in model.graph.node}
    kept = sorted(by_name[name] for name in statistics_nodes(model.graph))
    # RMS: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul;  LN: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div
    assert kept == sorted(["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul",
                           "ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div"])
    assert "LayerNormalization" in by_name.values()


def test_fp16_graph_keeps_norms_fp32_and_everything_else_fp16(fp32_path):
    original = onnx.load(str(fp32_path))
    before = original.SerializeToString()
    result = to_fp16(original)
    assert original.SerializeToString() == before, "to_fp16 must leave its input untouched"
    types = fp32_compute_nodes(result.model)
    nodes = {n.name: n for n in result.model.graph.node}
    for name in result.kept_fp32:
        assert types[name] == "FLOAT", f"{nodes[name].op_type} {name} computes in {types[name]}"
    matmuls = [types[n.name] for n in result.model.graph.node if n.op_type == "MatMul"]
    assert matmuls and set(matmuls) == {"FLOAT16"}
    io = [*result.model.graph.input, *result.model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    # LayerNorm's gamma/beta are the exact FP32 values, not an FP16 round trip
    ln = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    original_weights = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    gamma = weights[ln.input[1]]
    assert gamma.dtype == np.float32
    np.testing.assert_array_equal(gamma, original_weights[ln.input[1].removesuffix("_fp32")])


def test_parity_within_budget(fp32_path, tmp_path):
    x = residual_with_outliers()
    reference = run(str(fp32_path), x)
    dst = tmp_path / "block.fp16.onnx"
    write_fp16_onnx(fp32_path, dst)
    assert (tmp_path / "block.fp16.onnx.data").is_file(), "external data follows the source's layout"
    rel_l2, max_abs = within_budget(reference, run(str(dst), x))
    print(f"fp16 vs fp32: rel-L2 {rel_l2:.2e}, max |diff| / max |ref| {max_abs:.2e}")
    assert rel_l2 <= REL_L2_BUDGET and max_abs <= MAX_ABS_BUDGET, (rel_l2, max_abs)


def test_without_the_fp32_islands_the_statistics_would_run_in_fp16(fp32_path):
    """What the pass prevents. ORT CPU upcasts FP16 Pow/ReduceMean internally, so the overflow itself is not
    observable here; TensorRT runs them as typed. The plain float16 pass leaves (x - mean)^2 in FP16."""
    from onnxconverter_common import float16

    naive = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    types = fp32_compute_nodes(naive)
    pows = [types[n.name] for n in naive.graph.node if n.op_type == "Pow"]
    assert pows == ["FLOAT16", "FLOAT16"]
    x = residual_with_outliers()
    centred = x - x.mean(-1, keepdims=True)
    with np.errstate(over="ignore"):
        squares = centred.astype(np.float16) ** 2
    assert not np.isfinite(squares).all(), "FP16 squares of these activations overflow"


def test_the_models_own_casts_to_fp32_are_retyped():
    """TorchScript exports of `x / q.shape[-1] ** 0.5` hold Shape -> Gather -> Cast(to=FLOAT); left as is,
    the FP16 graph fails ORT's type check."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "one"], ["width"], name="gather", axis=0),
            helper.make_node("Cast", ["width"], ["width_f"], name="cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Sqrt", ["width_f"], ["scale"], name="sqrt"),
            helper.make_node("Div", ["x", "scale"], ["scaled"], name="div"),
            helper.make_node("MatMul", ["scaled", "W"], ["y"], name="matmul"),
        ],
        "cast",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
         numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = to_fp16(model)
    cast = next(n for n in result.model.graph.node if n.name == "cast")
    assert cast.attribute[0].i == onnx.TensorProto.FLOAT16
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(run(result.model, x), x / 2, rtol=1e-3)
