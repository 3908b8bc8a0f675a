"""ONNX export (opset 17, dynamic axes, explicit γ/β), torch.export artifacts, op census and lost-fusion flags."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from convert.context import shorter
from convert.export import (
    OPSET,
    ExportError,
    census,
    export_onnx,
    export_torch,
    lost_fusions,
    ort_session,
    run_onnx,
)
from convert.models import Source
from convert.pipeline import ConvertOptions, convert
from engines.manifest import TensorInfo

D = 8


class Block(torch.nn.Module):
    """Token embedding -> two Pre-norm residual blocks -> final norm -> head; `norm` builds each norm."""

    def __init__(self, norm=lambda: torch.nn.LayerNorm(D)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, D)
        self.norms = torch.nn.ModuleList([norm(), norm()])
        self.mlps = torch.nn.ModuleList([torch.nn.Linear(D, D), torch.nn.Linear(D, D)])
        self.final, self.head = norm(), torch.nn.Linear(D, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)                      # (batch, sequence, D)
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            h = h + mlp(norm(h))
        return self.head(self.final(h))                # (batch, sequence, 5)


INPUTS = [TensorInfo(name="input_ids", datatype="INT64", shape=[-1, -1])]
OUTPUTS = [TensorInfo(name="logits", datatype="FP32", shape=[-1, -1, 5])]


def ids(batch: int, length: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(batch * 100 + length).integers(0, 50, (batch, length))}


def torch_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs["input_ids"])).numpy()


@pytest.fixture(scope="module")
def ln_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("ln") / "model.onnx"
    return export_onnx(Block().eval(), ids(2, 5), path, inputs=INPUTS, outputs=OUTPUTS)


def test_opset_dynamic_axes_and_explicit_gamma_beta(ln_onnx):
    model = onnx.load(str(ln_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET == 17
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "sequence", 5]
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 3 and all(len(n.input) == 3 for n in norms)  # X, γ, β: what ORT's fusions need


def test_batch_and_sequence_stay_dynamic(ln_onnx):
    inputs = ids(3, 11)  # exported with (2, 5)
    out = run_onnx(ort_session(ln_onnx), inputs, chunk=2)
    assert out[0].shape == (3, 11, 5)
    np.testing.assert_allclose(out[0], torch_logits(Block().eval(), inputs), rtol=1e-5, atol=1e-5)


def test_census_counts_fused_norms_after_ort_optimization(ln_onnx):
    counts, outputs = census(ln_onnx, inputs=ids(3, 4))
    assert outputs[0].shape == (3, 4, 5)  # the census session also ran the inputs
    fused = sum(counts.get(op, 0) for op in ("LayerNormalization", "SkipLayerNormalization"))
    assert fused == 3 and counts.get("ReduceMean", 0) == 0 and counts["total"] > fused


def test_handwritten_rmsnorm_with_weight_fuses(tmp_path):
    from convert.modules import RMSNorm

    path = export_onnx(Block(lambda: RMSNorm(D, 1e-6)).eval(), ids(2, 5), tmp_path / "m.onnx",
                       inputs=INPUTS, outputs=OUTPUTS)
    counts, _ = census(path)
    fused = counts.get("SimplifiedLayerNormalization", 0) + counts.get("SkipSimplifiedLayerNormalization", 0)
    assert fused == 3, counts
    assert lost_fusions({"LayerNormalization": 3, "total": 20}, counts) == []  # LN -> RMS keeps the fusion


def test_nn_rmsnorm_is_refused_with_the_exporters_reason(tmp_path):
    model = Block(lambda: torch.nn.RMSNorm(D)).eval()
    with pytest.raises(ExportError, match="TorchScript exporter, opset 17.*rms_norm"):
        export_onnx(model, ids(2, 5), tmp_path / "m.onnx", inputs=INPUTS, outputs=OUTPUTS)


@pytest.mark.parametrize("kind", ["module", "torch.export"])
def test_torch_artifacts_run_other_shapes(tmp_path, kind):
    from engines import specs
    from engines.torch import TorchEngine

    model = Block().eval()
    if kind == "module":  # what the pipeline writes
        path = export_torch(model, tmp_path / "model.pt")
    else:  # a torch.export program, called positionally
        example = (torch.from_numpy(ids(2, 5)["input_ids"]),)
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.AUTO,
                                                                        1: torch.export.Dim.AUTO},))
        path = tmp_path / "model.pt2"
        torch.export.save(program, str(path))
    inputs = ids(4, 9)
    with TorchEngine(path, inputs=specs(INPUTS), outputs=specs(OUTPUTS)) as engine:
        out = engine.infer(inputs)["logits"]
    np.testing.assert_allclose(out, torch_logits(model, inputs), rtol=1e-6, atol=1e-6)


def test_a_module_that_cannot_be_pickled_is_an_export_error(tmp_path):
    model = Block().eval()
    model.hook = lambda x: x  # a lambda attribute cannot be pickled
    with pytest.raises(ExportError, match="torch.save of the module failed"):
        export_torch(model, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    ("candidate", "flags"),
    [
        ({"LayerNormalization": 3, "SkipLayerNormalization": 2, "total": 40}, []),
        ({"SimplifiedLayerNormalization": 3, "SkipSimplifiedLayerNormalization": 2, "total": 40}, []),
        ({"total": 30}, []),  # every norm removed on purpose (the no-norm bound): nothing lost
        ({"ReduceSum": 10, "Pow": 10, "Sqrt": 5, "total": 70}, ["lost-fusion:normalization"]),
        ({"LayerNormalization": 5, "total": 40}, ["lost-fusion:SkipLayerNormalization"]),
    ],
    ids=["same", "rms", "removed", "decomposed", "skip"],
)
def test_lost_fusion_flags(candidate, flags):
    reference = {"LayerNormalization": 3, "SkipLayerNormalization": 2, "total": 40}
    got = lost_fusions(reference, candidate)
    assert [flag.split(" ")[0] for flag in got] == flags


def test_example_inputs_are_shorter_on_dynamic_non_batch_axes():
    arrays = {"input_ids": np.zeros((4, 12), np.int64), "pixels": np.zeros((4, 3, 8, 8), np.float32)}
    infos = [TensorInfo(name="input_ids", datatype="INT64", shape=[-1, -1]),
             TensorInfo(name="pixels", datatype="FP32", shape=[-1, 3, 8, 8])]
    cut = shorter(arrays, infos)
    assert cut["input_ids"].shape == (4, 9) and cut["pixels"].shape == (4, 3, 8, 8)


class Broken(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    source = Source(name="broken", description="", model=Broken(), inputs=INPUTS, outputs=OUTPUTS,
                    task="test", sample_inputs=lambda n: ids(n, 4))
    with pytest.raises(RuntimeError, match="boom"):
        convert(source, "broken", tmp_path, ConvertOptions(progress=False, benchmark=False))
    assert list(tmp_path.iterdir()) == []


def test_a_reconversion_replaces_the_model_whole(tmp_path):
    source = Source(name="block", description="", model=Block().eval(), inputs=INPUTS, outputs=OUTPUTS,
                    task="test", sample_inputs=lambda n: ids(n, 6))
    options = ConvertOptions(variants=["unfused"], progress=False, benchmark=False, torch_artifacts=False, samples=4)
    first = convert(source, "block", tmp_path, options)
    (tmp_path / "block" / "stale.txt").write_text("from the old conversion")
    second = convert(source, "block", tmp_path, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block"]
    assert not (tmp_path / "block" / "stale.txt").exists()
    assert second.created_at > first.created_at and set(second.variants["unfused"].files) == {"onnx"}


def test_export_leaves_the_model_in_eval_mode(tmp_path):
    model = Block().eval()
    export_onnx(model, ids(2, 5), tmp_path / "m.onnx", inputs=INPUTS, outputs=OUTPUTS)
    assert not any(m.training for m in model.modules())  # the exporter restores the wrapper's mode onto it


class Histogram(torch.nn.Module):
    """An operator the TorchScript exporter cannot export at opset 17 (what MoE routing's histc hit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.histc(x, bins=4, min=-1, max=1).sum()


def test_an_unexportable_model_fails_in_one_line_and_the_exporter_output_goes_to_the_log(tmp_path, capfd, caplog):
    import logging

    from convert.export import ExportError, export_onnx

    info = [TensorInfo(name="x", datatype="FP32", shape=[-1, 3])]
    with caplog.at_level(logging.DEBUG), pytest.raises(ExportError) as failed:
        export_onnx(Histogram(), {"x": np.ones((2, 3), np.float32)}, tmp_path / "m.onnx", inputs=info,
                    outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, 3])])
    message = str(failed.value)
    assert "\n" not in message and "aten::histc" in message and "conversion log" in message, message
    printed = capfd.readouterr()
    assert "graph" not in printed.out + printed.err, printed  # nothing reached the terminal
    assert "Torch IR graph" in caplog.text  # the exporter's C-level print, captured into the log


def test_fused_experts_are_exported_through_batched_mm_and_switched_back(tmp_path):
    from convert.export import OPSET, export_onnx, ort_session, run_onnx
    from convert.exportable import describe_export
    from tests.convert import _hf_families as hf

    model, given = hf.olmoe()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapped = Logits().eval()
    assert "experts_implementation=batched_mm" in describe_export(wrapped, OPSET)
    info = [TensorInfo(name=name, datatype="INT64", shape=[-1, -1]) for name in ("input_ids", "attention_mask")]
    example = {name: tensor.numpy()[:, :5] for name, tensor in given.items()}
    path = export_onnx(wrapped, example, tmp_path / "m.onnx", inputs=info,
                       outputs=[TensorInfo(name="logits", datatype="FP32", shape=[-1, -1, hf.VOCAB])])
    assert model.config._experts_implementation == "grouped_mm"  # restored
    ids = torch.randint(0, hf.VOCAB, (3, 9), generator=torch.Generator().manual_seed(8))  # other routing
    (out,) = run_onnx(ort_session(path), {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
    with torch.no_grad():
        expected = wrapped(ids, torch.ones_like(ids)).numpy()
    assert np.linalg.norm(out - expected) <= 1e-5 * np.linalg.norm(expected)
