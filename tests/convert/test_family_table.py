"""The family table: what `rewrite(model, variant, inputs=...)` does on the architectures users bring.

Tiny Hugging Face models built from their configs (random weights, perturbed γ/β/statistics) are called the
way a user calls them, with their keyword inputs. Each entry is exact (checked here in float64 against the
original, independently of rewrite()'s own check; in float32 at the float32 gate for models that cannot run
in float64: transformers' fused MoE experts) or refused with a NotApplicable whose reason is asserted.
README's supported-families list is this table.
"""

import copy

import pytest
import torch

from convert.rewrites import NotApplicable, rewrite
from convert.rewrites.analysis import call_inputs, find_norms
from convert.rewrites.check import EXACT_GATE, FLOAT32_NORMS_GATE, checked_copy
from convert.verify import verify
from tests.convert import _hf_families as hf

RMS_REFUSAL = "RMSNorm reading the residual stream: it is not mean-invariant"
# family -> {variant: "exact" or a regex of the refusal}
TABLE = {
    "llama": {"affine": "exact", "rmsnorm": RMS_REFUSAL},
    "qwen2": {"affine": "exact", "rmsnorm": RMS_REFUSAL},
    "mistral": {"affine": "exact", "rmsnorm": RMS_REFUSAL},
    "phi3": {"affine": "exact", "rmsnorm": RMS_REFUSAL},
    "gemma": {"affine": "exact", "rmsnorm": RMS_REFUSAL},  # x̂·(1+w)
    "t5_encoder": {"affine": "exact", "crmsnorm": RMS_REFUSAL},  # T5LayerNorm: RMS without a mean
    "bloom": {"affine": "exact", "rmsnorm": "exact", "crmsnorm": "word_embeddings_layernorm is Post-LN"},
    "falcon": {"affine": "exact", "rmsnorm": "exact", "crmsnorm": "exact"},  # parallel block, shared LN, add_
    "gpt_bigcode": {"affine": "exact", "rmsnorm": "exact", "crmsnorm": "exact"},
    "mixtral": {"affine": "exact", "rmsnorm": RMS_REFUSAL},  # γ into the router and every expert's gate_up_proj
    # Pre-LN: every expert's down_proj re-centred; at width d−1 the grouped-matmul kernel needs 16-byte strides
    "mixtral_layernorm": {"rmsnorm": "exact", "crmsnorm": "does not run with its residual stream compressed"},
    # experts_implementation="batched_mm": checked in float64; at width d−1 the batched matmuls run
    "mixtral_batched": {"affine": "exact"},
    "mixtral_layernorm_batched": {"rmsnorm": "exact", "crmsnorm": "exact"},
    "qwen2_moe": {"affine": "exact", "crmsnorm": RMS_REFUSAL},  # + the shared expert and its gate
    "olmoe": {"affine": "exact", "rmsnorm": RMS_REFUSAL},
    "olmo": {"affine": "no norm has a γ/β to fold", "rmsnorm": "exact", "crmsnorm": "exact"},  # ε found numerically
    "deit": {"affine": "exact", "rmsnorm": "exact", "crmsnorm": "exact"},  # distillation token
    "beit": {"affine": "exact", "rmsnorm": "exact", "crmsnorm": "exact"},  # layer scale
    "swin": {"affine": "exact", "rmsnorm": "concatenates along the hidden axis"},  # patch merging
    "convnext": {"affine": "exact", "rmsnorm": "read by .*dwconv"},  # channels-first LN into the downsampling conv
    "resnet": {"folded": "exact", "affine": "has no layer computing a LayerNorm or RMSNorm"},
    "mobilenet_v2": {"folded": "exact"},  # TF-style padding: every BatchNorm follows its conv
}
# transformers' default fused experts (grouped_mm): no float64 kernel, so these are checked in float32
NO_FLOAT64 = ("mixtral", "mixtral_layernorm", "qwen2_moe", "olmoe")
CASES = [(family, variant, expected) for family, row in TABLE.items() for variant, expected in row.items()]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = hf.FAMILIES[family]()
        return cache[family]

    return get


@pytest.mark.parametrize(("family", "variant", "expected"), CASES, ids=[f"{f}-{v}" for f, v, _ in CASES])
def test_family_table(built, family, variant, expected):
    model, inputs = built(family)
    if expected != "exact":
        with pytest.raises(NotApplicable, match=expected):
            rewrite(model, variant, inputs=inputs)
        return
    original, no_float64 = checked_copy(model, inputs)  # float64, or float32 with the reason
    assert (no_float64 is not None) == (family in NO_FLOAT64), no_float64
    rewritten = rewrite(original, variant, inputs=inputs)  # rewrite() checks itself; this test checks again
    low = no_float64 or any(spec.precision != "float64" for spec in find_norms(original).values())
    dtype = "float32" if no_float64 else "float64"
    comparison = verify(original, rewritten, call_inputs(original, inputs), dtype=dtype)
    assert comparison.rel_l2 <= (FLOAT32_NORMS_GATE if low else EXACT_GATE), comparison.summary()
    changed = [name for name, p in rewritten.named_parameters()
               if name not in dict(original.named_parameters()) or not torch.equal(p, dict(original.named_parameters())[name])]
    assert changed, f"{variant} left {family} as it was"


def test_the_float32_result_matches_the_float32_model(built):
    model, inputs = built("llama")
    rewritten = rewrite(model, "affine", inputs=inputs)
    assert verify(model, rewritten, call_inputs(model, inputs), dtype="float32")
    assert next(rewritten.parameters()).dtype == torch.float32


def test_gemma_weight_becomes_zero_and_t5_weight_one(built):
    gemma = rewrite(built("gemma")[0], "affine", inputs=built("gemma")[1])
    assert not gemma.model.norm.weight.any()  # x̂·(1+0): the affine is the identity
    t5 = rewrite(built("t5_encoder")[0], "affine", inputs=built("t5_encoder")[1])
    assert torch.equal(t5.encoder.block[0].layer[0].layer_norm.weight, torch.ones(16))  # folded into q/k/v
    # the final norm's output is the model's output (last_hidden_state): nothing to fold it into, kept
    assert torch.equal(t5.encoder.final_layer_norm.weight, built("t5_encoder")[0].encoder.final_layer_norm.weight)


@pytest.mark.parametrize("family", ("mixtral_layernorm", "mixtral_layernorm_batched"))
def test_every_expert_of_a_pre_ln_moe_writes_a_zero_mean_stream(built, family):
    model, inputs = built(family)
    rewritten = rewrite(model, "rmsnorm", inputs=inputs)
    for before, after in zip(model.model.layers, rewritten.model.layers, strict=True):
        down = after.mlp.experts.down_proj.double()  # [experts, hidden (out), intermediate (in)]
        assert down.mean(1).abs().max() < 1e-6  # every expert's every input column centred over the outputs
        assert not torch.equal(down, before.mlp.experts.down_proj.double())
        assert after.self_attn.o_proj.weight.double().mean(0).abs().max() < 1e-6


@pytest.mark.parametrize("family", ("mixtral", "mixtral_batched", "qwen2_moe", "olmoe"))
def test_a_norm_before_the_experts_folds_into_the_router_and_every_expert(built, family):
    model, inputs = built(family)
    rewritten = rewrite(model, "affine", inputs=inputs)
    before, after = model.model.layers[0], rewritten.model.layers[0]
    gamma = before.post_attention_layernorm.weight.detach().double()
    assert torch.equal(after.post_attention_layernorm.weight, torch.ones_like(gamma).float())
    expected = {"gate.weight": before.mlp.gate.weight.double() * gamma,  # the router: [experts, in]
                "experts.gate_up_proj": before.mlp.experts.gate_up_proj.double() * gamma}  # [experts, out, in]
    if family == "qwen2_moe":
        expected["shared_expert.up_proj.weight"] = before.mlp.shared_expert.up_proj.weight.double() * gamma
        expected["shared_expert_gate.weight"] = before.mlp.shared_expert_gate.weight.double() * gamma
    folded = dict(after.mlp.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(folded[name].double(), value.float().double(), rtol=0, atol=0, msg=name)
    # the down projections write the residual stream: an affine fold leaves them as they were
    assert torch.equal(after.mlp.experts.down_proj, before.mlp.experts.down_proj)


def test_a_shift_before_fused_experts_is_left_with_the_reason(built):
    """The experts have no per-expert bias to receive β: that norm keeps its affine, the others fold."""
    from convert.rewrites.analysis import analyse

    model, inputs = built("mixtral_layernorm")
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        norm = layer.post_attention_layernorm
        norm.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, norm.weight.shape[0]))
    blockers = analyse(model, inputs).norms["model.layers.0.post_attention_layernorm"].blockers
    assert any("model.layers.0.mlp.experts has no bias" in b and "β" in b for b in blockers), blockers
    rewritten = rewrite(model, "affine", inputs=inputs)  # checked by rewrite() itself (float32 gate)
    kept = rewritten.model.layers[0].post_attention_layernorm
    assert torch.equal(kept.bias, model.model.layers[0].post_attention_layernorm.bias)
    assert torch.equal(rewritten.model.layers[0].input_layernorm.weight, torch.ones(32))  # q/k/v took it
