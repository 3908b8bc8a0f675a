"""Tiny Hugging Face models built from their configs (random weights, nothing downloaded), for the family table.

Each builder returns (model, inputs): an eval-mode model and the keyword inputs a user would pass it.
Sizes are the smallest each architecture accepts, so the whole table runs in CI on two cores.
"""

from __future__ import annotations

import torch

VOCAB, SEQ = 96, 7


def _seeded(config_cls, model_cls, **config):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    _perturb(model)
    return model


def _perturb(model: torch.nn.Module) -> None:
    """Random γ/β, running statistics and layer scales (fresh models have γ = 1, β = 0: a fold would be a no-op)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or tensor.dim() != 1:
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            else:
                tensor.add_(0.3 * noise)


def text(batch: int = 2, mask: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids} | ({"attention_mask": torch.ones_like(ids)} if mask else {})


def pixels(size: int = 32, channels: int = 3, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(4))}


_DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager")


def llama():
    return _seeded("LlamaConfig", "LlamaForCausalLM", **_DECODER), text()


def qwen2():
    return _seeded("Qwen2Config", "Qwen2ForCausalLM", **_DECODER), text()


def mistral():
    return _seeded("MistralConfig", "MistralForCausalLM", **_DECODER), text()


def phi3():
    return _seeded("Phi3Config", "Phi3ForCausalLM", **_DECODER, pad_token_id=0), text()


def gemma():
    return _seeded("GemmaConfig", "GemmaForCausalLM", **_DECODER, head_dim=8), text()


def t5_encoder():
    return _seeded("T5Config", "T5EncoderModel", vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                   num_heads=2, attn_implementation="eager"), text()


def bloom():
    return _seeded("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2,
                   attn_implementation="eager"), text()


def falcon():
    return _seeded("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                   num_attention_heads=2, parallel_attn=True, new_decoder_architecture=False, bias=True,
                   alibi=False, attn_implementation="eager"), text()


def gpt_bigcode():
    return _seeded("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                   n_positions=32, attn_implementation="eager"), text()


# mixtures of experts: transformers' fused experts (3-D weights, grouped matmuls; they cannot run in float64)
_MOE = dict(_DECODER, hidden_size=32, num_experts_per_tok=2)


def mixtral():
    return _seeded("MixtralConfig", "MixtralForCausalLM", **_MOE, num_local_experts=4), text()


def mixtral_layernorm():
    """Mixtral with LayerNorms (no β: the fused experts have no bias to take one) in place of its RMSNorms: a
    Pre-LN MoE, whose residual stream every expert's down projection writes."""
    model, inputs = mixtral()
    generator = torch.Generator().manual_seed(2)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "MixtralRMSNorm":
            norm = torch.nn.LayerNorm(module.weight.shape[0], eps=module.variance_epsilon, bias=False)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, norm)
    return model.eval(), inputs


def mixtral_batched():  # transformers' other traceable experts form: W[ids] gathered per token, one bmm
    model, inputs = mixtral()
    model.set_experts_implementation("batched_mm")  # runs in float64, unlike grouped_mm
    return model, inputs


def mixtral_layernorm_batched():
    model, inputs = mixtral_layernorm()
    model.set_experts_implementation("batched_mm")
    return model, inputs


def qwen2_moe():  # routed experts plus a shared expert behind a sigmoid gate
    return _seeded("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE, num_experts=4, moe_intermediate_size=16,
                   shared_expert_intermediate_size=32), text()


def olmoe():  # QK-norm over the whole q/k projections
    return _seeded("OlmoeConfig", "OlmoeForCausalLM", **_MOE, num_experts=4, pad_token_id=0, eos_token_id=1), text()


def olmo():  # a LayerNorm without weights and without an ε attribute
    return _seeded("OlmoConfig", "OlmoForCausalLM", **_DECODER, pad_token_id=0, eos_token_id=1), text()


_VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=8, num_labels=3, attn_implementation="eager")


def deit():
    return _seeded("DeiTConfig", "DeiTForImageClassificationWithTeacher", **_VIT), pixels(16)


def beit():
    return _seeded("BeitConfig", "BeitForImageClassification", **_VIT, layer_scale_init_value=0.1,
                   use_mean_pooling=False), pixels(16)


def swin():
    return _seeded("SwinConfig", "SwinForImageClassification", image_size=16, patch_size=2, embed_dim=8,
                   depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3,
                   attn_implementation="eager"), pixels(16)


def convnext():
    return _seeded("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16], depths=[1, 1],
                   num_stages=2, num_labels=3, layer_scale_init_value=0.1), pixels(16)


def resnet():
    return _seeded("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                   depths=[1, 1], layer_type="basic", num_labels=3), pixels(16)


def mobilenet_v2():
    return _seeded("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=32, depth_multiplier=0.25,
                   num_labels=3), pixels(32)


FAMILIES = {f.__name__: f for f in (llama, qwen2, mistral, phi3, gemma, t5_encoder, bloom, falcon, gpt_bigcode,
                                    mixtral, mixtral_layernorm, mixtral_batched, mixtral_layernorm_batched,
                                    qwen2_moe, olmoe, olmo, deit, beit, swin, convnext, resnet,
                                    mobilenet_v2)}
