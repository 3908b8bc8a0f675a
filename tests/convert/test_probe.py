"""The numeric probe finds ε where a norm does not expose it, and holds it to the same fit as a read ε."""

import pytest
import torch
from torch import nn

from convert.rewrites.probe import find_eps, probe_norm


class HiddenEpsNorm(nn.Module):
    """A LayerNorm (or RMSNorm) whose ε is a literal in forward, with no attribute to read."""

    def __init__(self, width: int, kind: str, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.kind, self._hidden, self.normalized_shape = kind, eps, (width,)  # the width of a weightless norm
        self.weight = nn.Parameter(torch.rand(width) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.rand(width) - 0.5) if affine and kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self._hidden)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self._hidden)
        return y if self.weight is None else self.weight * y


@pytest.mark.parametrize(("kind", "eps", "affine"), [("layernorm", 1e-5, False), ("layernorm", 3e-7, True),
                                                     ("rmsnorm", 1e-6, True), ("rmsnorm", 1e-12, False)])
def test_a_hidden_eps_is_found_from_what_the_norm_computes(kind, eps, affine):
    spec = probe_norm(HiddenEpsNorm(8, kind, eps, affine))
    assert spec is not None and spec.problem is None, spec
    assert (spec.kind, spec.eps) == (kind, eps)


def test_olmo_layernorm_without_weights_or_eps_attribute():
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    spec = probe_norm(OlmoLayerNorm(16))
    assert (spec.kind, spec.eps, spec.weight, spec.bias, spec.problem) == ("layernorm", 1e-5, None, None, None)
    assert spec.precision == "float32"  # it computes in float32 even in a float64 model


def test_eps_outside_the_root_is_still_refused():
    class OutsideRootNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)

    spec = probe_norm(OutsideRootNorm())
    assert spec.problem and "ε inside the root" in spec.problem


def test_find_eps_on_a_module_that_is_no_norm():
    assert find_eps(nn.Identity(), 8) is None
