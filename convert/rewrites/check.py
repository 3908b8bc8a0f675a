"""`rewrite()`'s own proof: the rewrite is run again on a float64 copy and compared with the float64 original.

The analysis refuses what it cannot prove; this check is the backstop that makes the public API as safe as
the pipeline's parity gate, on the inputs the user gave (or the model's example inputs). Rewrites are exact,
so float64 leaves only rounding (gate 1e-10); a model whose norms compute in float32 even in float64
(Hugging Face's RMSNorms cast x̂ to float32) can only be held to the float32 gate (1e-5), which still
catches any wrong rewrite (a mis-centred writer is off by O(1e-1)). So is a model that cannot run in float64
at all (transformers' grouped-matmul experts take float32/bfloat16/float16 only): it is checked in float32, and
the log says which check ran and why. A failure, or a check that cannot run, raises NotApplicable.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from convert.rewrites import NotApplicable, first_line  # noqa: F401 - first_line: callers import it from here

log = logging.getLogger(__name__)

EXACT_GATE = 1e-10  # float64 rounding of an exact rewrite
FLOAT32_NORMS_GATE = 1e-5  # a norm computes in float32 inside the float64 model


def check_exact(model: nn.Module, variant: str, apply, inputs: dict | None):
    """Rewrite a float64 copy of `model` with `apply(copy)` and compare it with the float64 original on
    `inputs` (a float32 copy, at the float32 gate, when the model cannot run in float64); return the
    Comparison (None when there is nothing to run it on), NotApplicable on a mismatch or when the check
    itself cannot run."""
    from convert.rewrites.analysis import example_inputs

    if inputs is None:
        try:
            inputs = example_inputs(model)
        except NotApplicable as error:
            log.warning("%s: not checked in float64 (%s); pass inputs= to check it", variant, error)
            return None
    try:
        original, why = checked_copy(model, inputs)
        return _compare(model, variant, apply, original, inputs, why)
    except NotApplicable:
        raise
    except Exception as error:  # noqa: BLE001 - the check cannot run: a reason, never a crash
        log.debug("%s: the self-check failed on %s", variant, type(model).__name__, exc_info=True)
        raise NotApplicable(f"{variant}: the rewritten {type(model).__name__} could not be checked: "
                            f"{first_line(error)}") from error


def checked_copy(model: nn.Module, inputs: dict) -> tuple[nn.Module, str | None]:
    """A float64 eval copy of `model`, or a float32 one with the reason when the model cannot run in float64."""
    from convert.rewrites.analysis import call_inputs
    from convert.verify import run

    original = copy.deepcopy(model).double().eval()
    try:
        run(original, call_inputs(original, inputs), torch.float64)
        return original, None
    except Exception as error:  # noqa: BLE001 - e.g. grouped-matmul kernels without a float64 version
        log.debug("%s does not run in float64", type(model).__name__, exc_info=True)
        why = f"{type(model).__name__} does not run in float64 ({first_line(error)})"
    del original
    return copy.deepcopy(model).float().eval(), why


def _compare(model: nn.Module, variant: str, apply, original: nn.Module, inputs: dict, why: str | None):
    from convert.rewrites.analysis import call_inputs, find_norms
    from convert.verify import verify

    dtype = "float32" if why else "float64"
    rewritten = apply(copy.deepcopy(original), call_inputs(original, inputs))
    low = [name for name, spec in find_norms(original).items() if spec.precision != "float64"]
    reason = why or (f"{low[0]} computes in float32" if low else None)
    gate = FLOAT32_NORMS_GATE if reason else EXACT_GATE
    comparison = verify(original, rewritten, call_inputs(original, inputs), dtype=dtype, gate={"rel_l2": gate})
    if not comparison:
        raise NotApplicable(
            f"{variant}: the rewritten {type(model).__name__} is not the same function on the given inputs "
            f"({dtype} rel-L2 {comparison.rel_l2:.2g} > {gate:g}); refusing it"
        )
    log.info("%s: %s check %s%s", variant, dtype, comparison.summary(), f" (float32 gate: {reason})" if reason else "")
    return comparison


def ensure_runs(model: nn.Module, inputs: dict | None, hint: str = "pass the keyword inputs you call it with") -> None:
    """ModelDoesNotRun (ending with `hint`) unless `model` runs on `inputs` (default: its example inputs, when it
    has any)."""
    from convert.rewrites import ModelDoesNotRun
    from convert.rewrites.analysis import call_inputs, example_inputs

    if inputs is None:
        try:
            inputs = example_inputs(model)
        except Exception:  # noqa: BLE001 - nothing to run it on: the rewrite says so itself
            return
    modes = {module: module.training for module in model.modules()}  # per module: a norm left in training mode
    try:  # is the rewrite's to refuse, so it must still be in training mode afterwards
        with torch.no_grad():
            model.eval()(**call_inputs(model, inputs))  # eval: running statistics are not updated
    except Exception as error:  # noqa: BLE001 - any failure: the inputs (or the model) are unusable
        log.debug("%s does not run on its inputs", type(model).__name__, exc_info=True)
        given = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor)
                          else f"{k}={v!r}" for k, v in inputs.items())
        raise ModelDoesNotRun(f"{type(model).__name__} does not run on its example inputs ({given}): "
                              f"{first_line(error)}{'; ' + hint if hint else ''}") from error
    finally:
        for module, training in modes.items():
            module.training = training

