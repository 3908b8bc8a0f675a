"""Numerical parity between a reference and a candidate: `compare` outputs, `verify` models.

A `Comparison` is truthy when it passes, records the tolerances it had to meet (`gate`) and the ones it
actually needed (`needed`), and becomes a manifest `Parity` with `to_parity`.

Gates (issue 2; norm-fusion notes §10):

- float64: rel-L2 ≤ 1e-10 — rewrites are exact, so only rounding at ~1e-16 remains.
- float32: rel-L2 ≤ 1e-5 (observed ~3e-7).
- float16 / bfloat16: a low-precision run is judged against the original model run in float64. The
  candidate passes when its rel-L2 error is at most twice the original's own low-precision error (plus
  a tiny floor, so an exactly-equal pair passes) and its argmax agreement with the float64 reference is
  lower than the original's by at most one position. Without such a baseline run (e.g. comparing a
  TensorRT fp16 engine with torch directly) `compare` falls back to a fixed rel-L2 gate.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from engines.manifest import Parity

DEFAULT_GATES: dict[str, dict[str, float]] = {
    "float64": {"rel_l2": 1e-10},
    "float32": {"rel_l2": 1e-5},
    # only used without a low-precision baseline run: ~10 ulps of the format's relative precision
    "float16": {"rel_l2": 1e-2},
    "bfloat16": {"rel_l2": 5e-2},
}
LOW_PRECISION = ("float16", "bfloat16")
FLOOR = 1e-12  # absolute floor on a relative gate, so that error 0 vs baseline error 0 passes
_ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
            "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass
class Comparison:
    passed: bool
    dtype: str                              # precision the candidate ran in, e.g. "float32"
    samples: int                            # batch size of the first output
    max_abs: float                          # max |reference − candidate| over all outputs
    rel_l2: float                           # ‖reference − candidate‖ / ‖reference‖ over all outputs
    cosine: float                           # cosine similarity of all outputs, flattened
    argmax_agreement: float | None          # last-axis argmax agreement of the first output (≥ 2 classes)
    gate: dict[str, float]                  # tolerances required, e.g. {"rel_l2": 1e-5}
    needed: dict[str, float]                # tolerances this comparison actually needed
    reference_error: float | None = None    # low precision: rel-L2 of the baseline run vs the fp64 reference
    candidate_error: float | None = None    # low precision: rel-L2 of the candidate vs the fp64 reference
    baseline_argmax_agreement: float | None = None  # low precision: the baseline's argmax agreement

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line for logs, e.g. 'passed float32: rel_l2 3.1e-07 ≤ 1e-05 …'."""
        checks = ", ".join(f"{k} {self.needed[k]:.3g} ≤ {v:.3g}" for k, v in self.gate.items())
        argmax = "" if self.argmax_agreement is None else f", argmax agreement {self.argmax_agreement:.4f}"
        return (f"{'passed' if self.passed else 'FAILED'} {self.dtype}: {checks}; max_abs {self.max_abs:.3g}, "
                f"cosine {self.cosine:.8f}{argmax} over {self.samples} samples")

    def to_parity(self, reference: str, candidate: str) -> Parity:
        """The manifest record; a non-finite error (NaN/inf output) is written as the largest float."""
        return Parity(
            passed=self.passed, reference=reference, candidate=candidate, dtype=self.dtype,
            samples=self.samples, max_abs=_finite(self.max_abs), rel_l2=_finite(self.rel_l2),
            cosine=self.cosine if math.isfinite(self.cosine) else -1.0,
            argmax_agreement=self.argmax_agreement,
            gate={k: _finite(v) for k, v in self.gate.items()},
            needed={k: _finite(v) for k, v in self.needed.items()},
        )


def compare(
    reference: object,
    candidate: object,
    *,
    dtype: str | torch.dtype = "float32",
    gate: Mapping[str, float] | None = None,
    baseline: object | None = None,
) -> Comparison:
    """Compare already-computed outputs: tensors, numpy arrays, or lists/tuples/dicts of them.

    `baseline` (low precision): the ORIGINAL model's outputs in `dtype`, with `reference` its float64
    outputs; the gate then becomes relative to the baseline's own error. `gate` overrides entries of
    the default gate. Raises ValueError when the outputs differ in number or shape.
    """
    name = dtype_name(dtype)
    ref, cand = _align(reference, candidate)
    stats = _measure(ref, cand)
    required = dict(DEFAULT_GATES[name])
    reference_error = baseline_agreement = None
    if baseline is not None:
        base = _measure(*_align(reference, baseline))
        reference_error, baseline_agreement = base["rel_l2"], base["argmax_agreement"]
        required = {"rel_l2": 2.0 * base["rel_l2"] + FLOOR}
        if base["positions"]:
            required["argmax_disagreement"] = (base["disagreements"] + 1) / base["positions"]
    required.update(gate or {})
    needed = {"rel_l2": stats["rel_l2"], "max_abs": stats["max_abs"], "cosine_distance": 1.0 - stats["cosine"]}
    if stats["positions"]:
        needed["argmax_disagreement"] = stats["disagreements"] / stats["positions"]
    unknown = set(required) - set(needed)
    if unknown:
        raise ValueError(f"gate names {sorted(unknown)}; a comparison measures {sorted(needed)}")
    passed = all(math.isfinite(needed[k]) and needed[k] <= v for k, v in required.items())
    return Comparison(
        passed=passed, dtype=name, samples=int(ref[0].shape[0]) if ref and ref[0].ndim else 1,
        max_abs=stats["max_abs"], rel_l2=stats["rel_l2"], cosine=stats["cosine"],
        argmax_agreement=stats["argmax_agreement"], gate=required, needed=needed,
        reference_error=reference_error, baseline_argmax_agreement=baseline_agreement,
        candidate_error=None if baseline is None else stats["rel_l2"],
    )


def verify(
    original: torch.nn.Module,
    rewritten: torch.nn.Module,
    inputs: object,
    *,
    dtype: str | torch.dtype = torch.float32,
    gate: Mapping[str, float] | None = None,
) -> Comparison:
    """Run both models (eval, no_grad) on `inputs` in `dtype` and compare their outputs.

    `inputs`: a dict of keyword tensors, a tuple of positional tensors, or one tensor (numpy arrays are
    accepted too). Floating inputs are cast to `dtype`; integer inputs such as token ids keep theirs.
    Neither the models nor the inputs are modified (models are cast and switched to eval on copies).
    In float16/bfloat16 both models run in `dtype` and are judged against the original in float64.

    The float64 gate (1e-10) checks the rewrite's math, so give it models rewritten in float64
    (`rewrite(model.double(), …)`): weights folded in float32 and cast up carry ~1e-8 of rounding.
    """
    name = dtype_name(dtype)
    low = getattr(torch, name)
    if name in LOW_PRECISION:
        reference = run(original, inputs, torch.float64)
        baseline = run(original, inputs, low)
        return compare(reference, run(rewritten, inputs, low), dtype=name, gate=gate, baseline=baseline)
    return compare(run(original, inputs, low), run(rewritten, inputs, low), dtype=name, gate=gate)


def run(model: torch.nn.Module, inputs: object, dtype: torch.dtype) -> list[np.ndarray]:
    """`model`'s outputs on `inputs` in `dtype`, as float64 numpy arrays (see `verify`)."""
    prepared = _cast_model(model, dtype)
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    if isinstance(inputs, Mapping):
        args, kwargs = (), {k: _cast_input(v, dtype, device) for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(_cast_input(v, dtype, device) for v in inputs), {}
    else:
        args, kwargs = (_cast_input(inputs, dtype, device),), {}
    with torch.no_grad():
        return _flatten(prepared(*args, **kwargs))


def dtype_name(dtype: str | torch.dtype) -> str:
    """'float32' for torch.float32, 'fp32', 'float32' …; ValueError for a dtype without a gate."""
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DEFAULT_GATES:
        raise ValueError(f"dtype {dtype!r} has no parity gate; expected one of {', '.join(DEFAULT_GATES)}")
    return name


def _cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()) and not any(
        m.training for m in model.modules()
    ):
        return model
    return copy.deepcopy(model).to(dtype).eval()


def _cast_input(value: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    target = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target, copy=True)  # a copy: a model may write into its input


def _flatten(outputs: object) -> list[np.ndarray]:
    """Outputs as a list of float64 arrays; an HF ModelOutput contributes its logits (or first tensor)."""
    if outputs is None:
        return []
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().to(device="cpu", dtype=torch.float64).numpy()]
    if isinstance(outputs, (np.ndarray, np.generic, int, float)):
        return [np.asarray(outputs, dtype=np.float64)]
    if _is_model_output(outputs):
        logits = outputs.get("logits")
        return _flatten(logits if logits is not None else next(iter(outputs.values())))
    if isinstance(outputs, Mapping):
        return [a for v in outputs.values() for a in _flatten(v)]
    if isinstance(outputs, (list, tuple)):
        return [a for v in outputs for a in _flatten(v)]
    raise TypeError(f"cannot compare outputs of type {type(outputs).__name__}")


def _is_model_output(value: object) -> bool:
    """A Hugging Face ModelOutput, recognised without importing transformers."""
    return any(cls.__name__ == "ModelOutput" for cls in type(value).__mro__)


def _align(reference: object, candidate: object) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both flattened, `candidate` in `reference`'s order (dicts are matched by key), shapes checked."""
    plain = [isinstance(x, Mapping) and not _is_model_output(x) for x in (reference, candidate)]
    if all(plain):
        if set(reference) != set(candidate):
            raise ValueError(f"outputs differ: reference has {sorted(reference)}, candidate {sorted(candidate)}")
        candidate = {k: candidate[k] for k in reference}
    ref, cand = _flatten(reference), _flatten(candidate)
    if [a.shape for a in ref] != [a.shape for a in cand]:
        raise ValueError(
            f"output shapes differ: reference {[a.shape for a in ref]}, candidate {[a.shape for a in cand]}"
        )
    return ref, cand


def _measure(ref: list[np.ndarray], cand: list[np.ndarray]) -> dict:
    """Error statistics of `cand` against `ref` over all outputs, plus argmax counts of the first."""
    r = np.concatenate([a.ravel() for a in ref]) if ref else np.zeros(0)
    c = np.concatenate([a.ravel() for a in cand]) if cand else np.zeros(0)
    stats = _errors(r, c)
    stats.update(argmax_agreement=None, disagreements=0, positions=0)
    if ref and ref[0].ndim >= 1 and ref[0].shape[-1] >= 2 and ref[0].size:
        agree = np.argmax(ref[0], axis=-1) == np.argmax(cand[0], axis=-1)
        stats.update(argmax_agreement=float(agree.mean()), disagreements=int((~agree).sum()), positions=agree.size)
    return stats


def _errors(r: np.ndarray, c: np.ndarray) -> dict[str, float]:
    same = r == c  # equal infinities (e.g. masked logits) count as agreement
    if not np.all(np.isfinite(r[~same]) & np.isfinite(c[~same])):
        return {"max_abs": math.inf, "rel_l2": math.inf, "cosine": math.nan}
    keep = np.isfinite(r)  # the non-finite entries left are equal in both
    r, c = r[keep], c[keep]
    diff = r - c
    norm_r, norm_c, norm_d = np.linalg.norm(r), np.linalg.norm(c), np.linalg.norm(diff)
    rel_l2 = float(norm_d / norm_r) if norm_r > 0 else (0.0 if norm_d == 0 else math.inf)
    if norm_r > 0 and norm_c > 0:
        cosine = float(np.clip(np.dot(r, c) / (norm_r * norm_c), -1.0, 1.0))
    else:
        cosine = 1.0 if norm_r == norm_c else 0.0  # both zero: identical
    return {"max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0, "rel_l2": rel_l2, "cosine": cosine}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else sys.float_info.max
