"""`rmsnorm`: Pre-LN → Pre-RMSNorm by re-centring every writer of the residual stream."""

import json
from collections import Counter

import pytest
import torch
from torch import nn

from convert.modules import Center, RMSNorm
from convert.rewrites import NotApplicable, rewrite
from convert.rewrites.analysis import analyse
from tests.convert._models_a import WIDTH, TinyViT, check_equivalence, low_precision_ratio


def inputs(model, batch=4):
    return {"x": torch.randn(batch, model.patches, model.patch_dim, generator=torch.Generator().manual_seed(2))}


def zero_mean(tensor, axis=-1):
    return tensor.double().mean(axis).abs().max().item() < 1e-6


def test_layernorms_become_rmsnorms_and_outputs_match():
    model = TinyViT()
    converted = rewrite(model, "rmsnorm")
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())
    norms = [m for m in converted.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 5 and all(n.eps == 1e-5 and torch.equal(n.weight, torch.ones(WIDTH)) for n in norms)
    assert all(n.bias is None for n in norms)  # β folded away, not carried
    # every writer of the stream was found and centred: cls, positions, patch embedding, proj, fc2
    assert zero_mean(converted.cls) and zero_mean(converted.pos)
    assert zero_mean(converted.patch.weight, 0) and zero_mean(converted.patch.bias, 0)
    for block in converted.blocks:
        assert zero_mean(block.proj.weight, 0) and zero_mean(block.fc2.weight, 0) and zero_mean(block.fc2.bias, 0)
        assert not zero_mean(block.fc1.weight, 0)  # readers are folded, not centred
    assert not zero_mean(model.cls)  # the input model is untouched
    check_equivalence(model, "rmsnorm", inputs(model))


def test_analysis_finds_every_reader_and_writer_by_dataflow():
    report = analyse(TinyViT()).describe()
    json.dumps(report)  # goes into manifests as is
    assert report["width"] == WIDTH and report["stream_blockers"] == []
    assert report["norms"]["blocks.0.norm1"]["readers"] == ["blocks.0.qkv.weight"]
    assert report["norms"]["norm"]["readers"] == ["head.weight"]  # through the [:, 0] select
    assert sorted(report["stream_writers"]) == sorted(
        ["linear patch.weight", "tensor cls", "tensor pos"]
        + [f"linear blocks.{i}.{layer}.weight" for i in range(2) for layer in ("proj", "fc2")])


def test_every_moe_expert_is_centred():
    model = TinyViT(moe=True)
    converted = rewrite(model, "rmsnorm")
    for block in converted.blocks:
        assert all(zero_mean(expert[2].weight, 0) and zero_mean(expert[2].bias, 0) for expert in block.moe.experts)
        assert not zero_mean(block.moe.router.weight, 0)  # the router reads the norm: folded, not centred
    check_equivalence(model, "rmsnorm", inputs(model))


def test_post_ln_is_refused_with_the_layer_named():
    with pytest.raises(NotApplicable, match=r"blocks\.\d\.norm\d is Post-LN: its output is the residual stream"):
        rewrite(TinyViT(post_ln=True), "rmsnorm")


def test_a_post_ln_prefix_is_kept_and_centred_at_the_boundary():
    model = TinyViT(depth=3, post_ln=1)  # Mix-LN: block 0 Post-LN, blocks 1-2 Pre-LN
    converted = rewrite(model, "rmsnorm")
    assert isinstance(converted.blocks[0].norm1, nn.LayerNorm)  # its output feeds qkv: stays LayerNorm
    boundary = converted.blocks[0].norm2  # the prefix's last norm writes the Pre-LN stream
    assert isinstance(boundary, nn.Sequential) and isinstance(boundary[1], Center)
    assert all(isinstance(b.norm1, RMSNorm) and isinstance(b.norm2, RMSNorm) for b in converted.blocks[1:])
    assert isinstance(converted.norm, RMSNorm)
    check_equivalence(model, "rmsnorm", inputs(model))
    with pytest.raises(NotApplicable, match=r"blocks\.0\.norm\d is Post-LN"):
        rewrite(model, "crmsnorm")  # compression does not centre at a boundary


def test_an_embedding_layernorm_is_converted_and_centred_after():
    model = TinyViT(embed_norm=True)
    converted = rewrite(model, "rmsnorm")
    assert isinstance(converted.embed_norm[0], RMSNorm) and isinstance(converted.embed_norm[1], Center)
    assert converted.embed_norm[0].bias is not None  # read by the stream, not by linear layers: β kept
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())
    check_equivalence(model, "rmsnorm", inputs(model))


class StreamOut(TinyViT):
    """Returns the residual stream itself (no final norm): re-centring would change the output."""

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patch(x)], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return h


class NonAffineWriter(TinyViT):
    """The stream starts at a tanh: no weight edit can remove its mean."""

    def forward(self, x):
        h = torch.tanh(self.patch(x))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


def test_a_non_affine_writer_is_refused():
    with pytest.raises(NotApplicable, match=r"^NonAffineWriter writes the residual stream through tanh.*not affine"):
        rewrite(NonAffineWriter(), "rmsnorm")
    rewrite(NonAffineWriter(), "affine")  # folding γ/β does not care who writes the stream


def test_a_model_returning_the_raw_stream_is_refused():
    with pytest.raises(NotApplicable, match=r"StreamOut returns the residual stream .*without a norm"):
        rewrite(StreamOut(), "rmsnorm")


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(width) + 0.1), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def test_an_rmsnorm_model_is_refused_because_rmsnorm_is_not_mean_invariant():
    model = TinyViT()
    model.norm = LlamaStyleRMSNorm(WIDTH)
    with pytest.raises(NotApplicable, match=r"^norm is an RMSNorm reading the residual stream"):
        rewrite(model, "rmsnorm")
    folded = rewrite(model, "affine")  # its γ still folds
    assert torch.equal(folded.norm.weight, torch.ones(WIDTH))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_in_low_precision_stays_within_twice_the_original_error(dtype):
    model = TinyViT()
    assert low_precision_ratio(model, "rmsnorm", dtype, inputs(model, batch=16)) <= 2.0


def ort_op_counts(path, tmp_path):
    """Op types left after ONNX Runtime's ORT_ENABLE_ALL optimization on CPU."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_exported_rmsnorm_is_fused_by_onnx_runtime(tmp_path):
    """The explicit ones weight is what lets ORT fuse the pattern into SimplifiedLayerNormalization."""
    import numpy as np

    from convert.export import export_onnx
    from engines.manifest import TensorInfo

    model = TinyViT()
    example = {"x": np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)}
    specs = {"inputs": [TensorInfo(name="x", datatype="FP32", shape=[-1, 4, 16])],
             "outputs": [TensorInfo(name="y", datatype="FP32", shape=[-1, 5])]}
    counts = ort_op_counts(export_onnx(rewrite(model, "rmsnorm"), example, tmp_path / "rms.onnx", **specs), tmp_path)
    assert counts["SimplifiedLayerNormalization"] + counts["SkipSimplifiedLayerNormalization"] == 5
    assert counts["LayerNormalization"] == 0 and counts["Sqrt"] == 0
    # the same graph as the affine fold (which adds the β biases the bias-free qkv layers lacked): one
    # fused norm in place of each LayerNormalization, no leftover ops around it
    folded = ort_op_counts(export_onnx(rewrite(model, "affine"), example, tmp_path / "ln.onnx", **specs), tmp_path)
    assert sum(counts.values()) == sum(folded.values()) and folded["LayerNormalization"] == 5
