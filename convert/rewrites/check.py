"""`rewrite()`'s own proof: the rewrite is run again on a float64 copy and compared with the float64 original.

The analysis refuses what it cannot prove; this check is the backstop that makes the public API as safe as
the pipeline's parity gate, on the inputs the user gave (or the model's example inputs). Rewrites are exact,
so float64 leaves only rounding (gate 1e-10); a model whose norms compute in float32 even in float64
(Hugging Face's RMSNorms cast x̂ to float32) can only be held to the float32 gate (1e-5), which still
catches any wrong rewrite (a mis-centred writer is off by O(1e-1)). A failure raises NotApplicable.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from convert.rewrites import NotApplicable, first_line  # noqa: F401 - first_line: callers import it from here

log = logging.getLogger(__name__)

EXACT_GATE = 1e-10  # float64 rounding of an exact rewrite
FLOAT32_NORMS_GATE = 1e-5  # a norm computes in float32 inside the float64 model


def check_exact(model: nn.Module, variant: str, apply, inputs: dict | None):
    """Rewrite a float64 copy of `model` with `apply(copy)` and compare it with the float64 original on
    `inputs`; return the Comparison (None when there is nothing to run it on), NotApplicable on a mismatch."""
    from convert.rewrites.analysis import call_inputs, example_inputs, find_norms
    from convert.verify import verify

    if inputs is None:
        try:
            inputs = example_inputs(model)
        except NotApplicable as error:
            log.warning("%s: not checked in float64 (%s); pass inputs= to check it", variant, error)
            return None
    original = copy.deepcopy(model).double().eval()
    rewritten = apply(copy.deepcopy(original), call_inputs(original, inputs))
    low = [name for name, spec in find_norms(original).items() if spec.precision != "float64"]
    gate = FLOAT32_NORMS_GATE if low else EXACT_GATE
    comparison = verify(original, rewritten, call_inputs(original, inputs), dtype="float64", gate={"rel_l2": gate})
    if not comparison:
        raise NotApplicable(
            f"{variant}: the rewritten {type(model).__name__} is not the same function on the given inputs "
            f"(float64 rel-L2 {comparison.rel_l2:.2g} > {gate:g}); refusing it"
        )
    log.info("%s: float64 check %s%s", variant, comparison.summary(),
             f" (float32 gate: {low[0]} computes in float32)" if low else "")
    return comparison
