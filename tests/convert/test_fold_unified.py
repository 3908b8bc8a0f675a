"""`rewrite(model, "folded")` on UN / PowerNorm models: UN disappears, PowerNorm's affine folds, parity holds,
the ONNX graph has no normalization left, and the unsafe cases refuse with a reason."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from convert import NotApplicable, rewrite
from convert.export import export_onnx, ort_session, run_onnx
from convert.models import vit_digits as vd
from convert.models.norms import GroupScaling, PowerNorm, UnifiedNorm
from convert.rewrites.fold_unified import fold_affine_into_linear, fold_unified_norms
from convert.verify import verify

TINY = vd.ViTConfig(dim=16, depth=2, heads=2)
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "ReduceMean", "Sqrt", "BatchNormalization"}


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every UN/PN layer non-trivial running statistics and affine (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (UnifiedNorm, PowerNorm)):
                running = m.running_var if isinstance(m, UnifiedNorm) else m.running_phi
                running.copy_(torch.rand(running.shape, generator=g) * 3 + 0.2)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()


def tiny(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return with_statistics(vd.ViT(replace(TINY, norm=norm)))


def images(n: int = 16) -> dict[str, torch.Tensor]:
    return {"images": torch.from_numpy(vd.digits_split()[1][:n])}


def test_math_matches_the_unfolded_affine_then_linear():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    s, beta, x = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    w2, b2 = fold_affine_into_linear(w, b, s, beta)
    torch.testing.assert_close(w2 @ x + b2, w @ (s * x + beta) + b, rtol=0, atol=1e-13)
    w3, b3 = fold_affine_into_linear(w, None, s, beta)  # no bias: one is created
    torch.testing.assert_close(w3 @ x + b3, w @ (s * x + beta), rtol=0, atol=1e-13)


def test_un_folds_completely_with_parity():
    model = tiny("unified")
    before = copy.deepcopy(model.state_dict())
    folded = rewrite(model, "folded")
    assert not any(isinstance(m, (UnifiedNorm, PowerNorm, nn.LayerNorm)) for m in folded.modules())
    assert isinstance(folded.blocks[0].norm1, nn.Identity) and isinstance(folded.norm, nn.Identity)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert isinstance(model.blocks[0].norm1, UnifiedNorm)
    fp32 = verify(model, folded, images(), dtype="float32")
    assert fp32, fp32
    fp64 = verify(model.double(), rewrite(model.double(), "folded"), images(), dtype="float64")
    assert fp64 and fp64.rel_l2 < 1e-12, fp64


def test_fold_returns_the_folded_layer_names():
    model = tiny("unified")
    names = fold_unified_norms(model)
    assert names == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert fold_unified_norms(vd.ViT(TINY).eval()) == []  # LayerNorm models: nothing of ours to fold


def test_folded_un_onnx_has_no_normalization_left(tmp_path):
    model, source = tiny("unified"), vd.digits_split()[1][:8]
    folded = rewrite(model, "folded")
    path = export_onnx(folded, {"images": source[:2]}, tmp_path / "folded.onnx",
                       inputs=vd.input_specs(), outputs=vd.output_specs())
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    optimized = tmp_path / "optimized.onnx"
    session = ort_session(path, optimized_path=optimized)
    ops |= {node.op_type for node in onnx.load(str(optimized)).graph.node}
    assert not ops & NORM_OPS, ops & NORM_OPS
    assert "MatMul" in ops or "Gemm" in ops
    (logits,) = run_onnx(session, {"images": source})
    with torch.no_grad():
        expected = model(images=torch.from_numpy(source)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_pn_affine_folds_and_group_scaling_stays():
    model = tiny("power")
    folded = rewrite(model, "folded")
    assert not any(isinstance(m, PowerNorm) for m in folded.modules())
    assert isinstance(folded.blocks[0].norm1, GroupScaling) and folded.blocks[0].norm1.group_num == TINY.heads
    assert not torch.equal(folded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert verify(model, folded, images(), dtype="float32")
    fp64 = verify(model.double(), rewrite(model.double(), "folded"), images(), dtype="float64")
    assert fp64 and fp64.rel_l2 < 1e-12, fp64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_fold_is_no_worse_than_the_original(dtype):
    model = tiny("unified")
    folded = rewrite(model, "folded")  # folded in float64, cast once to float32; verify casts both
    result = verify(model, folded, images(64), dtype=dtype)
    assert result, result
    assert result.candidate_error <= 2 * result.reference_error + 1e-3


def test_refuses_a_norm_in_training_mode():
    model = tiny("unified")
    model.blocks[1].norm2.train()
    with pytest.raises(NotApplicable, match=r"blocks\.1\.norm2.*training mode"):
        rewrite(model, "folded")


class PostNorm(nn.Module):
    """x + Linear(UN(x)) with the norm output also on the residual: Post-LN style, not foldable."""

    def __init__(self, reader: str = "residual"):
        super().__init__()
        self.norm, self.fc, self.other, self.reader = UnifiedNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), reader

    def forward(self, x):
        y = self.norm(x)
        if self.reader == "residual":
            return y + self.fc(y)
        if self.reader == "gelu":
            return self.fc(torch.nn.functional.gelu(y))
        if self.reader == "shared":
            return self.fc(y) + self.fc(x)          # fc also reads the un-normalised stream
        if self.reader == "channel-slice":
            return self.fc(y[..., :4].repeat(1, 1, 2))
        return self.fc(y[:, 0]) + self.other(y).mean(1)  # "token-slice": indexing tokens is fine


TOKENS = {"x": torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("reader, reason", [
    ("residual", r"norm: norm is read by PostNorm through add"),
    ("gelu", r"norm: norm is read by PostNorm through gelu"),
    ("shared", r"norm: fc.weight is also used elsewhere"),
    ("channel-slice", r"norm: norm is read by PostNorm through slice"),
])
def test_refuses_non_linear_readers(reader, reason):
    model = with_statistics(PostNorm(reader))
    with pytest.raises(NotApplicable, match=reason):
        rewrite(model, "folded", inputs=TOKENS)


def test_token_indexing_between_norm_and_linear_folds():
    model = with_statistics(PostNorm("token-slice"))
    folded = rewrite(model, "folded", inputs=TOKENS)
    x = torch.randn(3, 5, 8)
    assert isinstance(folded.norm, nn.Identity)
    assert verify(model, folded, x, dtype="float32")


def test_refuses_a_tied_reader_weight():
    model = with_statistics(PostNorm("token-slice"))
    model.other.weight = model.fc.weight
    with pytest.raises(NotApplicable, match="tied"):
        rewrite(model, "folded", inputs=TOKENS)


@pytest.mark.slow  # trains vit-digits-un and -pn once (then the weight cache answers)
def test_trained_un_and_pn_keep_their_accuracy():
    for builder in (vd.vit_digits_un, vd.vit_digits_pn):
        source = builder()
        folded = rewrite(source.model, "folded")
        assert source.evaluate(folded) == source.metrics, source.name


@pytest.mark.slow  # converts the trained models (cached weights) through the whole pipeline
@pytest.mark.parametrize("builder", ["vit-digits-un", "vit-digits-pn"])
def test_folded_variant_goes_through_the_conversion_pipeline(builder, tmp_path):
    from convert.export import export_onnx
    from convert.models import load_source
    from convert.pipeline import ConvertOptions, convert

    source = load_source(builder)
    probe = copy.deepcopy(source.model)
    export_onnx(probe, source.sample_inputs(2), tmp_path / "probe.onnx", inputs=source.inputs, outputs=source.outputs)
    assert not probe.training, "export_onnx must leave the model it exports in eval mode"
    options = ConvertOptions(variants=["unfused", "folded"], benchmark=False, torch_artifacts=False,
                             progress=False, samples=16)
    manifest = convert(source, "m", tmp_path / "repo", options)
    folded = manifest.variants["folded"]
    assert folded.servable and all(p.passed for p in folded.parity)
    census = set(folded.op_census) - {"total", "Div"}  # Div: the image scaling inside forward
    if builder == "vit-digits-un":
        assert not census & NORM_OPS, census
    else:  # PowerNorm's per-token group scaling stays
        assert {"ReduceMean", "Sqrt"} <= census
