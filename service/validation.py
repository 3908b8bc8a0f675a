"""The one check every inference request passes before it is queued, whatever protocol brought it (HTTP, gRPC):
names, datatypes and shapes against the engine's specs, then the limits the manifest records for the source
model (token ids within the vocabulary, sequences no longer than the positions, inputs sharing a shape, no empty
sequence). A failure is `InputError` (400) naming the input, the value and the limit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engines.base import InputError, TensorSpec, check_inputs
from engines.manifest import InputConstraint


def check_request(specs: Sequence[TensorSpec], constraints: Sequence[InputConstraint],
                  arrays: Mapping[str, np.ndarray]) -> int:
    """Raise InputError unless `arrays` is a request this engine can run; return its row count."""
    check_inputs(list(specs), arrays)
    for constraint in constraints:
        if constraint.name in arrays:
            check_constraint(constraint, arrays)
    return next(iter(arrays.values())).shape[0]


def check_constraint(c: InputConstraint, arrays: Mapping[str, np.ndarray]) -> None:
    array = arrays[c.name]
    why = f" ({c.source})" if c.source else ""
    if c.same_shape_as is not None and c.same_shape_as in arrays and array.shape != arrays[c.same_shape_as].shape:
        raise InputError(f"input {c.name!r}: shape {list(array.shape)} differs from input {c.same_shape_as!r}'s "
                         f"{list(arrays[c.same_shape_as].shape)}; they must be equal")
    for axis, low in c.axis_min.items():
        if axis < array.ndim and array.shape[axis] < low:
            raise InputError(f"input {c.name!r}: dimension {axis} is {array.shape[axis]}, at least {low} is needed"
                             f"{why}")
    for axis, high in c.axis_max.items():
        if axis < array.ndim and array.shape[axis] > high:
            raise InputError(f"input {c.name!r}: dimension {axis} is {array.shape[axis]}, the model takes at most "
                             f"{high}{why}")
    if array.size and (c.min_value is not None or c.max_value is not None):
        _check_values(c, array, why)


def _check_values(c: InputConstraint, array: np.ndarray, why: str) -> None:
    low = -np.inf if c.min_value is None else c.min_value
    high = np.inf if c.max_value is None else c.max_value
    outside = (array < low) | (array > high)
    if outside.any():
        where = tuple(int(i) for i in np.argwhere(outside)[0])
        raise InputError(f"input {c.name!r}: value {array[where].item()!r} at {list(where)} is outside "
                         f"[{_num(c.min_value, '-inf')}, {_num(c.max_value, 'inf')}]{why}")


def _num(value: float | None, unbounded: str) -> str:
    if value is None:
        return unbounded
    return str(int(value)) if float(value).is_integer() else str(value)
