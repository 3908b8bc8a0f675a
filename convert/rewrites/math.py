"""The tensor arithmetic of the normalization rewrites, as pure functions.

Every function computes in float64 and casts back once to the dtype of the tensor it replaces. Weight
layouts: "out_in" is nn.Linear's [out, in] (also Conv2d's [out, in, kh, kw]: axis 0 is the output);
"in_out" is Hugging Face Conv1D's [in, out] (GPT-2), where every "output" operation moves to axis 1.
Fused mixture-of-experts weights hold one matrix per expert on axis 0: "experts_out_in" [E, out, in]
(transformers' Mixtral/Qwen2-MoE/OLMoE experts) and "experts_in_out" [E, in, out]; every operation applies
to each expert's matrix alike.
"""

from __future__ import annotations

import torch

OUT_IN = "out_in"
IN_OUT = "in_out"
EXPERTS_OUT_IN = "experts_out_in"
EXPERTS_IN_OUT = "experts_in_out"
_OUT_AXIS = {OUT_IN: 0, IN_OUT: 1, EXPERTS_OUT_IN: 1, EXPERTS_IN_OUT: 2}
_IN_AXIS = {OUT_IN: 1, IN_OUT: 0, EXPERTS_OUT_IN: 2, EXPERTS_IN_OUT: 1}


def _float64_copy(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy that may be changed in place (`.double()` returns `t` itself when it is float64).

    The in-place steps below compute exactly what their out-of-place forms do, with one float64 temporary
    of a weight instead of two or three (GPT-2's 50257×768 head: 0.3 GB each)."""
    return t.detach().to(torch.float64, copy=True)


CHUNK_VALUES = 4 * 1024**2  # values per float64 chunk of a large weight (32 MB)


def spans(t: torch.Tensor, axis: int) -> list[tuple[int, int]]:
    """(start, length) slices of `t` along `axis`, each holding at most CHUNK_VALUES values.

    A weight no larger than CHUNK_VALUES is one slice (small models compute exactly as before); a large
    one (GPT-2's 50257×768 head: 0.3 GB in float64) is computed a block of rows at a time, so its float64
    temporary is one block, not a whole copy."""
    size = t.shape[axis] if t.dim() else 1
    per_slice = max(1, t.numel() // max(size, 1))
    step = max(1, CHUNK_VALUES // per_slice)
    return [(start, min(step, size - start)) for start in range(0, size, step)] or [(0, size)]


def _out_axis(layout: str) -> int:
    if layout not in _OUT_AXIS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {', '.join(_OUT_AXIS)}")
    return _OUT_AXIS[layout]


def in_axis(layout: str) -> int:
    """The input axis of a weight in `layout` (1 for nn.Linear's [out, in], 2 for experts [E, out, in])."""
    _out_axis(layout)  # the same check
    return _IN_AXIS[layout]


def fold_affine_into_linear(
    w: torch.Tensor,
    b: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    layout: str = OUT_IN,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W·(γ⊙u + β) + b == W'·u + b' with W' = W·diag(γ), b' = b + W·β (β uses the original W).

    `w` is a Linear weight ([out, in], or HF Conv1D's [in, out] with layout IN_OUT) or a Conv weight
    [out, in/groups, k…] reading u channels-first; a Conv is exact only when it reads no zero padding (a
    padded zero was β before the fold). Returns (W', b'); b' is created (zeros + Wβ, on W's device) when b
    is None and β is given, and stays None when both are None.
    """
    out_axis = _out_axis(layout)
    if beta is not None and layout in (EXPERTS_OUT_IN, EXPERTS_IN_OUT):
        raise ValueError("fused experts have no per-expert bias here to receive β")  # the analysis refuses first
    new_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    shift = None if beta is None else torch.empty(w.shape[out_axis], dtype=torch.float64, device=w.device)
    others = [a for a in range(w.dim()) if a != out_axis]
    # block by block along the output axis (every output row is independent): one float64 block at a time
    for start, length in spans(w, out_axis):
        w64 = _float64_copy(w.narrow(out_axis, start, length))
        if shift is not None:  # β first: it uses the original W, which is then scaled in place
            shift[start:start + length] = (w64 * _per_input(beta, w, layout, groups, start, length)).sum(others)
        if gamma is not None:
            w64.mul_(_per_input(gamma, w, layout, groups, start, length))
        new_w.narrow(out_axis, start, length).copy_(w64)
    if shift is None:
        return new_w, b
    new_b = shift if b is None else b.double() + shift
    return new_w, new_b.to(w.dtype if b is None else b.dtype)


def _per_input(v: torch.Tensor, w: torch.Tensor, layout: str, groups: int, start: int, length: int) -> torch.Tensor:
    """A per-input-channel vector shaped to broadcast against output rows [start, start+length) of `w`."""
    v64 = v.detach().to(w.device, torch.float64)
    if layout in (EXPERTS_OUT_IN, EXPERTS_IN_OUT):  # every expert's input axis
        return v64.reshape([-1 if a == in_axis(layout) else 1 for a in range(3)])
    if layout == IN_OUT:
        return v64.reshape(-1, 1)  # [in, 1] against [in, out-block]
    out_channels, in_per_group = w.shape[0], w.shape[1]
    trailing = (1,) * (w.dim() - 2)
    if groups == 1:
        return v64.reshape(1, -1, *trailing)
    # output channel o reads the input channels of its group o // (out/groups)
    rows = v64.reshape(groups, in_per_group).repeat_interleave(out_channels // groups, dim=0)  # [out, in/groups]
    return rows[start:start + length].reshape(length, in_per_group, *trailing)


def center_output_rows(
    w: torch.Tensor, b: torch.Tensor | None, layout: str = OUT_IN
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """P·(W u + b): make every output vector of a linear (or conv) layer zero-mean over its outputs.

    W ← W − mean over the output axis (each input column is centred), b ← b − mean(b).
    """
    out_axis = _out_axis(layout)
    w64 = _float64_copy(w)
    new_w = w64.sub_(w64.mean(out_axis, keepdim=True)).to(w.dtype)
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
    axis = axis % max(t.dim(), 1)
    if t.dim() < 2 or axis == 0:
        t64 = _float64_copy(t)
        return t64.sub_(t64.mean(axis, keepdim=True)).to(t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for start, length in spans(t, 0):  # rows are independent: centre a block of rows at a time
        t64 = _float64_copy(t.narrow(0, start, length))
        out.narrow(0, start, length).copy_(t64.sub_(t64.mean(axis, keepdim=True)))
    return out


def center_embedding_rows(table: torch.Tensor) -> torch.Tensor:
    """Centre each row of an embedding table [V, d] over the hidden axis."""
    return center_along(table, -1)


def drop_along(t: torch.Tensor, axis: int, index: int = -1) -> torch.Tensor:
    """CRMS writer compression: a zero-mean vector is stored without entry `index` (x_k = −Σ others)."""
    keep = [i for i in range(t.shape[axis]) if i != index % t.shape[axis]]
    return t.index_select(axis, torch.tensor(keep, device=t.device))  # a new tensor, never a view


def compress_writer(
    w: torch.Tensor, b: torch.Tensor | None, layout: str = OUT_IN, index: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop output coordinate `index` of an already centred writer (W_o[:d−1, :], b_o[:d−1] for the last)."""
    out_axis = _out_axis(layout)
    return drop_along(w, out_axis, index), None if b is None else drop_along(b, 0, index)


def compress_readers(w: torch.Tensor, layout: str = OUT_IN, index: int = -1) -> torch.Tensor:
    """A reader of a zero-mean x̂ given x̂ without entry k: W̃ = W[:, ≠k] − W[:, k]·1ᵀ (input axis)."""
    axis = in_axis(layout)
    along = 1 - axis if w.dim() == 2 else 0  # the output (or experts) axis: every entry is computed independently
    kept = drop_along(w.detach(), axis, index)  # a new tensor: the result is written into it in place
    dropped = w.detach().narrow(axis, index % w.shape[axis], 1)
    for start, length in spans(kept, along):  # one float64 block at a time (the same values as whole)
        block = kept.narrow(along, start, length)
        block.copy_(block.to(torch.float64).sub_(dropped.narrow(along, start, length).double()))
    return kept
