"""The exact normalization rewrites, by variant name.

Every rewrite is a pure function `model -> new model`: it works on a deep copy, leaves its input
untouched, and raises `NotApplicable` naming the layer that blocks it and why. `rewrite()` is the one
entry point; the functions live one per module and are imported lazily.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging

import torch

log = logging.getLogger(__name__)


class NotApplicable(ValueError):
    """A rewrite cannot be applied exactly to this model; the message names the layer and the reason."""


def first_line(error: BaseException) -> str:
    """An exception as one short line (no graph dumps: those go to the debug log)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:200]}{'…' if len(line) > 200 else ''}"


class ModelDoesNotRun(ValueError):
    """A usage error: the model does not run on the inputs it was given (checked before any rewrite)."""


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
            share_weights: bool = False, check: bool = True) -> torch.nn.Module:
    """Return a new module in eval mode computing the same function as `model` with `variant` applied.

    `inputs`: example keyword inputs to trace the model with (a small batch); they are handed to the
    variant's function when it takes an `inputs` argument (the graph-analysing rewrites), and otherwise
    the function finds its own (`model.example_inputs()`, or from the model's config).

    `share_weights`: the new module reuses the input's parameter and buffer storage wherever the rewrite does
    not replace a tensor, instead of copying every tensor first (a model's size less memory). The rewrites
    never write a tensor in place (they assign new ones), so the input still stays untouched; but neither
    module may then be modified in place (training, `.copy_()`) without changing the other.

    `check` (default on): the rewrite is proved on `inputs` (or the model's example inputs) by running it
    again on a float64 copy and comparing with the float64 original (`convert.rewrites.check`); a mismatch
    refuses. It costs two float64 copies of the model: turn it off for very large models (the pipeline does,
    and runs its own parity gate). The benchmark-only `nonorm` is never checked (it is not exact).

    The input model is left untouched. Raises NotApplicable (a ValueError) when the rewrite cannot be
    applied exactly, whatever the cause (an unexpected error inside a rewrite becomes a NotApplicable
    naming it; the traceback goes to the debug log), ModelDoesNotRun (a ValueError) when the model does not
    run on `inputs` (or its example inputs), before any rewrite, and ValueError for an unknown variant name.
    """
    if variant not in REWRITES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(REWRITES)}")
    from convert.rewrites.check import ensure_runs

    ensure_runs(model, inputs)

    module_name, function_name = REWRITES[variant].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    from convert.rewrites.check import check_exact

    def apply(copied: torch.nn.Module, example: dict | None) -> torch.nn.Module:
        extra = {"inputs": example} if example is not None and takes_inputs(function) else {}
        try:
            return function(copied, **extra)
        except NotApplicable:
            raise
        except Exception as error:  # noqa: BLE001 - a model that runs gets a result or a reason, never a crash
            log.debug("%s failed on %s", variant, type(model).__name__, exc_info=True)
            raise NotApplicable(f"{variant} cannot be applied to {type(model).__name__}: {first_line(error)}") from error

    # the copy keeps the input's train/eval mode so a rewrite can refuse statistics that are not fixed
    memo = shared_tensors(model) if share_weights else {}
    new = apply(copy.deepcopy(model, memo), inputs)
    if check and variant not in BENCHMARK_ONLY:
        check_exact(model, variant, apply, inputs)
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
