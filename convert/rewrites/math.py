"""The tensor arithmetic of the normalization rewrites, as pure functions.

Every function computes in float64 and casts back once to the dtype of the tensor it replaces. Weight
layouts: "out_in" is nn.Linear's [out, in] (also Conv2d's [out, in, kh, kw]: axis 0 is the output);
"in_out" is Hugging Face Conv1D's [in, out] (GPT-2), where every "output" operation moves to axis 1.
"""

from __future__ import annotations

import torch

OUT_IN = "out_in"
IN_OUT = "in_out"


def _out_axis(layout: str) -> int:
    if layout not in (OUT_IN, IN_OUT):
        raise ValueError(f"unknown weight layout {layout!r}; expected {OUT_IN!r} or {IN_OUT!r}")
    return 0 if layout == OUT_IN else 1


def fold_affine_into_linear(
    w: torch.Tensor,
    b: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    layout: str = OUT_IN,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W·(γ⊙u + β) + b == W'·u + b' with W' = W·diag(γ), b' = b + W·β (β uses the original W).

    Returns (W', b'); b' is created (zeros + Wβ) when b is None and β is given, and stays None when
    both are None.
    """
    out_axis = _out_axis(layout)
    w64 = w.double()
    in_axis = 1 - out_axis
    new_w = w64 if gamma is None else w64 * gamma.double().reshape([-1 if a == in_axis else 1 for a in range(2)])
    if beta is None:
        return new_w.to(w.dtype), b
    shift = w64 @ beta.double() if layout == OUT_IN else beta.double() @ w64  # (out,)
    new_b = shift if b is None else b.double() + shift
    return new_w.to(w.dtype), new_b.to(w.dtype if b is None else b.dtype)


def center_output_rows(
    w: torch.Tensor, b: torch.Tensor | None, layout: str = OUT_IN
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """P·(W u + b): make every output vector of a linear (or conv) layer zero-mean over its outputs.

    W ← W − mean over the output axis (each input column is centred), b ← b − mean(b).
    """
    out_axis = _out_axis(layout)
    w64 = w.double()
    new_w = (w64 - w64.mean(out_axis, keepdim=True)).to(w.dtype)
    new_b = None if b is None else (b.double() - b.double().mean()).to(b.dtype)
    return new_w, new_b


def scale_output_rows(
    w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor, layout: str = OUT_IN
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """s ⊙ (W u + b) == W' u + b' with W' = diag(s)·W, b' = s ⊙ b (LayerScale folded into its linear)."""
    out_axis = _out_axis(layout)
    s64 = scale.double().reshape([-1 if a == out_axis else 1 for a in range(w.dim())])
    new_b = None if b is None else (b.double() * scale.double().reshape(-1)).to(b.dtype)
    return (w.double() * s64).to(w.dtype), new_b


def center_along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Subtract the mean over `axis` (a cls token, a position table, a constant added to the stream)."""
    t64 = t.double()
    return (t64 - t64.mean(axis, keepdim=True)).to(t.dtype)


def center_embedding_rows(table: torch.Tensor) -> torch.Tensor:
    """Centre each row of an embedding table [V, d] over the hidden axis."""
    return center_along(table, -1)


def drop_along(t: torch.Tensor, axis: int, index: int = -1) -> torch.Tensor:
    """CRMS writer compression: a zero-mean vector is stored without entry `index` (x_k = −Σ others)."""
    keep = [i for i in range(t.shape[axis]) if i != index % t.shape[axis]]
    return t.index_select(axis, torch.tensor(keep, device=t.device)).clone()


def compress_writer(
    w: torch.Tensor, b: torch.Tensor | None, layout: str = OUT_IN, index: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop output coordinate `index` of an already centred writer (W_o[:d−1, :], b_o[:d−1] for the last)."""
    out_axis = _out_axis(layout)
    return drop_along(w, out_axis, index), None if b is None else drop_along(b, 0, index)


def compress_readers(w: torch.Tensor, layout: str = OUT_IN, index: int = -1) -> torch.Tensor:
    """A reader of a zero-mean x̂ given x̂ without entry k: W̃ = W[:, ≠k] − W[:, k]·1ᵀ (input axis)."""
    in_axis = 1 - _out_axis(layout)
    w64 = w.double()
    dropped = w64.narrow(in_axis, index % w.shape[in_axis], 1)
    return (drop_along(w64, in_axis, index) - dropped).to(w.dtype)
