"""The models and variants `make gpu-check` times: ViT-S/16 and GPT-2-small from their Hugging Face configs.

Random weights (nothing is downloaded), with every LayerNorm's γ/β drawn at random too, so folding them is not a
no-op the parity column could not catch. GPT-2's head is untied from its embedding (`tie_word_embeddings=False`):
the UN fold writes ln_f's affine into the head, which a tied weight would also change in the embedding.

Variants, each a module of its own built with `convert.rewrite` (the same rewrites `normfuse convert` applies):
`unfused` (the model as built), `affine` and `rmsnorm` (exact), `un-folded` (every LayerNorm replaced by an
eval-mode Unified Normalization with random running statistics, then folded away by the `folded` rewrite — a
different function from the LN model, timed as what a UN-trained model would cost; its parity reference is the
unfolded UN model), and the benchmark-only `nonorm` bound (every norm removed).

Only torch, transformers and `convert.rewrites` are imported (no pydantic, no ONNX): the GPU image has no more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

VARIANTS = ("unfused", "affine", "rmsnorm", "un-folded", "nonorm")
EXACT = {"unfused": True, "affine": True, "rmsnorm": True, "un-folded": True, "nonorm": False}


class Logits(nn.Module):
    """An HF model called with keyword inputs, returning its logits (what the rewrites trace and we time)."""

    def __init__(self, model: nn.Module, extra: dict, example: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.extra, self.example = model, extra, example

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self.example

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, **self.extra).logits


@dataclass(frozen=True)
class ModelSpec:
    """What one benchmark model is: its builder's sizes and its input."""

    name: str
    tiny: bool
    seq_len: int = 128

    def build(self) -> Logits:
        builder = {"vit-s16": _vit, "gpt2-small": _gpt2}[self.name]
        torch.manual_seed(0)
        model = builder(self.tiny).eval()
        jitter_norms(model, seed=1)
        return Logits(model, {"use_cache": False} if self.name.startswith("gpt2") else {}, self.inputs(2))

    def inputs(self, batch: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch)
        if self.name.startswith("gpt2"):
            vocab = 256 if self.tiny else 50257
            ids = torch.randint(0, vocab, (batch, self.seq_len), generator=generator)
            return {"input_ids": ids.to(device)}
        size = 32 if self.tiny else 224
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        return {"pixel_values": pixels.to(device, dtype)}


def _vit(tiny: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    sizes = (dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=10) if tiny else
             dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536, num_labels=1000))  # ViT-S/16, as benchmarks/prepare.py builds it
    return ViTForImageClassification(ViTConfig(**sizes, attn_implementation="sdpa"))


def _gpt2(tiny: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = (dict(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
             if tiny else {})  # GPT2Config's defaults: GPT-2-small, 124 M parameters
    return GPT2LMHeadModel(GPT2Config(**sizes, tie_word_embeddings=False, attn_implementation="sdpa"))


def jitter_norms(model: nn.Module, seed: int) -> None:
    """γ ~ 1 + 0.1·N(0,1), β ~ 0.1·N(0,1) in every LayerNorm, in place (a freshly built model has γ=1, β=0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def with_unified_norms(model: nn.Module, seed: int = 2) -> nn.Module:
    """A copy with every nn.LayerNorm replaced by an eval-mode UnifiedNorm (same γ/β, random running σ²)."""
    from convert.models.norms import UnifiedNorm

    generator = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model)
    for name, module in list(new.named_modules()):
        if not isinstance(module, nn.LayerNorm):
            continue
        channels = module.normalized_shape[-1]
        norm = UnifiedNorm(channels, eps=module.eps)
        with torch.no_grad():
            norm.weight.copy_(module.weight)
            norm.bias.copy_(module.bias)
            norm.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, attr, norm)
    return new.eval()


def build_variants(model: Logits, notes: list[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(variant -> module, variant -> the module its outputs are compared with), all on the CPU in float32.

    The rewrites' own float64 proof is skipped (check=False: two float64 copies of GPT-2 per rewrite); the
    parity column of the report measures each variant against its reference on the device instead. A rewrite
    that refuses (another torch, another transformers) is left out with its reason in `notes`.
    """
    from convert.rewrites import rewrite

    example = model.example_inputs()
    unified = with_unified_norms(model)
    sources = {"affine": (model, "affine"), "rmsnorm": (model, "rmsnorm"), "un-folded": (unified, "folded"),
               "nonorm": (model, "nonorm")}
    variants = {"unfused": model}
    for name, (source, rewrite_name) in sources.items():
        try:
            variants[name] = rewrite(source, rewrite_name, inputs=example, check=False)
        except Exception as exc:  # noqa: BLE001 - one refused rewrite must not sink the device run
            notes.append(f"{type(model.model).__name__}: variant `{name}` not built: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
    references = {name: unified if name == "un-folded" else model for name in variants}
    return variants, references
