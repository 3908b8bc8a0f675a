"""The modules the exact rewrites introduce, written like a reference model file.

Statistics are computed in at least float32 (float64 stays float64, so the float64 proof gates are met)
and cast back once. ε sits inside the square root, as in PyTorch's LayerNorm, so a LayerNorm reading a
zero-mean vector and an `RMSNorm` with the same ε compute the same thing.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 -> float32 (a good norm kernel's accumulator); float32 and float64 unchanged
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + ε) · weight, over the last axis.

    The weight is all ones after a rewrite (γ is folded into the readers) but is kept as an explicit
    tensor: ONNX Runtime only fuses the pattern into SimplifiedLayerNormalization when the final scale
    Mul is present (notes §1.3). `bias=True` keeps a LayerNorm's β for a norm whose output is read by
    something γ/β cannot be folded into (e.g. the model output).
    """

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(_stats_dtype(dtype))  # (..., d)
        y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight  # (..., d)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class CRMSNorm(nn.Module):
    """RMSNorm of a zero-mean d-vector stored without its last entry (width d−1).

    The missing entry is −Σx̃, so mean(x²) over the full d is (Σx̃² + (Σx̃)²) / d: it divides by d, not d−1
    (notes §3.2). The output is the first d−1 entries of RMSNorm(x).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim  # the full width d, one more than the input's
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(_stats_dtype(dtype))  # (..., d-1)
        square_sum = x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)  # (..., 1)
        return (x / torch.sqrt(square_sum / self.dim + self.eps) * self.weight).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.dim} (input width {self.dim - 1}), eps={self.eps}"


class Center(nn.Module):
    """Subtract the mean over one axis: puts a tensor on the zero-mean subspace (the projector P)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(self.dim, keepdim=True)


class CenteredInputs(nn.Module):
    """Centre some of a model's inputs before calling it ("centre at the boundary").

    Used when a model input is itself the residual stream (e.g. `nn.TransformerEncoder` takes the
    embedded sequence): the input is a writer whose weights cannot be re-centred, so one mean
    subtraction is inserted where it enters.
    """

    def __init__(self, model: nn.Module, axes: dict[str, int]):
        super().__init__()
        self.model = model
        self.axes = dict(axes)  # input name -> its hidden axis
        self._names = list(inspect.signature(model.forward).parameters)

    def forward(self, *args, **kwargs):
        args = list(args)
        for name, axis in self.axes.items():
            if name in kwargs:
                kwargs[name] = Center(axis)(kwargs[name])
            elif name in self._names and self._names.index(name) < len(args):
                index = self._names.index(name)
                args[index] = Center(axis)(args[index])
        return self.model(*args, **kwargs)
