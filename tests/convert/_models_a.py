"""Small models with random weights for the normalization-rewrite tests (nothing is downloaded)."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB, WIDTH, SEQ = 50, 32, 7


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm a non-trivial γ (≈1 ± 0.3) and β (≈ ±0.2), as trained models have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                for name, scale, base in (("weight", 0.3, 1.0), ("bias", 0.2, 0.0)):
                    tensor = getattr(module, name, None)
                    if isinstance(tensor, torch.Tensor):
                        tensor.copy_(base + scale * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def seeded(build, seed: int = 0):
    """Build with a fixed seed without touching the global RNG (tests must not depend on their order)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def hf(config_cls, model_cls, **config):
    model = seeded(lambda: model_cls(config_cls(**config, attn_implementation="eager")))
    return perturb_norms(model)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return hf(GPT2Config, GPT2LMHeadModel, n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=16,
              bos_token_id=0, eos_token_id=0)


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return hf(OPTConfig, OPTForCausalLM, num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2, ffn_dim=64,
              vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=WIDTH, pad_token_id=1,
              bos_token_id=0, eos_token_id=0)


def neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return hf(GPTNeoXConfig, GPTNeoXForCausalLM, num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16, use_parallel_residual=True,
              bos_token_id=0, eos_token_id=0)


def gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return hf(GPTJConfig, GPTJForCausalLM, n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=16,
              rotary_dim=8, bos_token_id=0, eos_token_id=0)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return hf(LlamaConfig, LlamaForCausalLM, num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return hf(ViTConfig, ViTForImageClassification, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, image_size=8, patch_size=4, num_labels=3)


def dinov2():
    """LayerScale: a per-channel parameter scales each branch output before the residual add."""
    from transformers import Dinov2Config, Dinov2Model

    model = hf(Dinov2Config, Dinov2Model, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
               image_size=8, patch_size=4, layerscale_value=0.5)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("lambda1"):
                tensor.copy_(0.5 + 0.3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def bert():
    from transformers import BertConfig, BertModel

    return hf(BertConfig, BertModel, num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16)


def transformer_encoder():
    def build():
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(WIDTH), enable_nested_tensor=False)

    return perturb_norms(seeded(build))


class Block(nn.Module):
    """A Pre-LN block (post_ln=True: Post-LN) with a bias-free qkv, as in T2T-ViT or GPT-J."""

    def __init__(self, width: int, post_ln: bool = False):
        super().__init__()
        self.post_ln = post_ln
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.moe = None  # a MoE in place of the MLP when set

    def attention(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, d) each
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ v)

    def mlp(self, x):
        if self.moe is not None:
            return self.moe(x)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    def forward(self, x):
        if self.post_ln:
            x = self.norm1(x + self.attention(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MoE(nn.Module):
    """A dense-gated mixture of experts, Σₑ softmax(router(x))ₑ · expertₑ(x): every expert writes the stream."""

    def __init__(self, width: int, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(experts)
        )

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)  # (B, N, E)
        out = torch.zeros_like(x)  # (B, N, d)
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e : e + 1] * expert(x)
        return out


class TinyViT(nn.Module):
    """A hand-written Pre-LN ViT: patch Linear, cls token and position parameters, final LN + head."""

    def __init__(self, width: int = WIDTH, depth: int = 2, patch_dim: int = 16, patches: int = 4,
                 classes: int = 5, post_ln: bool | int = False, moe: bool = False, embed_norm: bool = False,
                 seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._build(width, depth, patch_dim, patches, classes, post_ln, moe, embed_norm)
        perturb_norms(self)

    def _build(self, width, depth, patch_dim, patches, classes, post_ln, moe, embed_norm):
        self.patches, self.patch_dim = patches, patch_dim
        self.patch = nn.Linear(patch_dim, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, width) + 0.5)
        # post_ln: True for all blocks, or the number of leading Post-LN blocks (a Mix-LN prefix)
        self.blocks = nn.ModuleList(Block(width, i < (depth if post_ln is True else int(post_ln))) for i in range(depth))
        self.embed_norm = nn.LayerNorm(width) if embed_norm else None  # BLOOM/CLIP-style LN on the embeddings
        if moe:
            for block in self.blocks:
                block.moe = MoE(width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def example_inputs(self):
        return {"x": torch.randn(2, self.patches, self.patch_dim, generator=torch.Generator().manual_seed(0))}

    def forward(self, x):
        h = self.patch(x)  # (B, P, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos  # (B, P+1, d)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])  # (B, classes)


class NormThenGelu(nn.Module):
    """A norm read through a nonlinearity: γ/β cannot be folded into anything."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.embed, self.norm, self.out = seeded(lambda: (nn.Linear(8, width), nn.LayerNorm(width), nn.Linear(width, 3)))
        perturb_norms(self)

    def example_inputs(self):
        return {"x": torch.randn(2, 8, generator=torch.Generator().manual_seed(0))}

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.norm(self.embed(x))))


def check_equivalence(original: nn.Module, variant: str, inputs: dict, output=lambda y: y) -> None:
    """The proof gates on float64 and float32 copies of `original`: rel-L2 ≤ 1e-10 and ≤ 1e-5."""
    from convert.rewrites import rewrite

    for dtype, gate in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = copy.deepcopy(original).to(dtype)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            want, got = output(model(**cast)), output(rewrite(model, variant)(**cast))
        assert rel_l2(got, want) <= gate, (variant, dtype, rel_l2(got, want))


def low_precision_ratio(original: nn.Module, variant: str, dtype: torch.dtype, inputs: dict) -> float:
    """err(rewritten in dtype) / err(original in dtype), both against the float64 original."""
    from convert.rewrites import rewrite

    low = copy.deepcopy(original).to(dtype)
    rewritten = rewrite(low, variant)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        reference = copy.deepcopy(original).double()(**{k: v.double() if v.is_floating_point() else v
                                                         for k, v in inputs.items()})
        return rel_l2(rewritten(**cast), reference) / rel_l2(low(**cast), reference)
