"""The exact normalization rewrites, by variant name.

Every rewrite is a pure function `model -> new model`: it works on a deep copy, leaves its input
untouched, and raises `NotApplicable` naming the layer that blocks it and why. `rewrite()` is the one
entry point; the functions live one per module and are imported lazily.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import torch


class NotApplicable(ValueError):
    """A rewrite cannot be applied exactly to this model; the message names the layer and the reason."""


# variant -> "module:function". `exact` variants compute the same function; `nonorm` is the
# benchmark-only no-norm bound (norms removed) and is never served.
REWRITES: dict[str, str] = {
    "affine": "convert.rewrites.affine:fold_affine",
    "rmsnorm": "convert.rewrites.pre_rmsnorm:to_pre_rmsnorm",
    "crmsnorm": "convert.rewrites.crmsnorm:to_pre_crmsnorm",
    "folded": "convert.rewrites.folded:fold_statistics",
    "nonorm": "convert.rewrites.nonorm:remove_norms",
    # the reparameterization int8 is built on (exact; not a served variant of its own, see convert.quantize)
    "smoothed": "convert.rewrites.smooth:smooth",
}
EXACT_VARIANTS = ("affine", "rmsnorm", "crmsnorm", "folded")
BENCHMARK_ONLY = ("nonorm",)


def rewrite(model: torch.nn.Module, variant: str, *, inputs: dict[str, torch.Tensor] | None = None,
            share_weights: bool = False) -> torch.nn.Module:
    """Return a new module in eval mode computing the same function as `model` with `variant` applied.

    `inputs`: example keyword inputs to trace the model with (a small batch); they are handed to the
    variant's function when it takes an `inputs` argument (the graph-analysing rewrites), and otherwise
    the function finds its own (`model.example_inputs()`, or from the model's config).

    `share_weights`: the new module reuses the input's parameter and buffer storage wherever the rewrite does
    not replace a tensor, instead of copying every tensor first (a model's size less memory). The rewrites
    never write a tensor in place (they assign new ones), so the input still stays untouched; but neither
    module may then be modified in place (training, `.copy_()`) without changing the other.

    The input model is left untouched. Raises NotApplicable (a ValueError) when the rewrite cannot be
    applied exactly, and ValueError for an unknown variant name.
    """
    if variant not in REWRITES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(REWRITES)}")
    module_name, function_name = REWRITES[variant].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    extra = {"inputs": inputs} if inputs is not None and takes_inputs(function) else {}
    # the copy keeps the input's train/eval mode so a rewrite can refuse statistics that are not fixed
    memo = shared_tensors(model) if share_weights else {}
    new = function(copy.deepcopy(model, memo), **extra)
    return new.eval()


def shared_tensors(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo giving each parameter/buffer a new tensor object over the same storage (ties kept)."""
    memo: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return memo


def takes_inputs(function) -> bool:
    """Whether a rewrite function accepts example inputs (`inputs=`)."""
    return "inputs" in inspect.signature(function).parameters
