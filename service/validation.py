"""The checks every inference request passes, whatever protocol brought it (HTTP, gRPC): names, datatypes and
shapes against the engine's specs, then the limits the manifest records for the source model (token ids within
the vocabulary, sequences no longer than the positions, inputs sharing a shape, no empty sequence). A failure is
`InputError` (400) naming the input, the value and the limit.

`check_header` runs them on the request's header alone, before any tensor is decoded (so a request's element
counts are bounded by the model's spec before memory is spent on them); `check_request` runs them again on the
decoded arrays, with the values. `answer_size` is what the answer will weigh, before compute."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engines.base import Engine, InputError, TensorSpec, check_inputs
from engines.manifest import InputConstraint
from oip.codec import checked_dtype
from oip.schema import InferenceRequest

JSON_CHARS = {"f": 16, "i": 8, "u": 8, "b": 5}  # about how many characters of JSON one value of a kind becomes


def check_header(specs: Sequence[TensorSpec], constraints: Sequence[InputConstraint],
                 request: InferenceRequest) -> dict[str, np.ndarray]:
    """Raise (ProtocolError, InputError) unless the declared inputs fit the engine: names (so their count),
    datatypes, shapes, axis limits, with the messages `check_request` gives. Returns zero-cost stand-ins (read-only,
    zero strides) of each declared shape."""
    stand_ins = {}
    for item in request.inputs:
        dtype = checked_dtype(item, "input")
        stand_ins[item.name] = np.broadcast_to(np.zeros((), dtype), item.shape)
    check_inputs(list(specs), stand_ins)
    for constraint in constraints:
        if constraint.name in stand_ins:
            check_constraint(constraint, stand_ins, values=False)
    return stand_ins


@dataclass(frozen=True)
class Size:
    """One output's shape for a request, and its bytes as binary and (about) as JSON text."""

    shape: tuple[int, ...]
    binary: int
    json: int


def answer_size(engine: Engine, declared: Mapping[str, np.ndarray]) -> dict[str, Size]:
    """Each output's size for a request whose inputs have the `declared` shapes, before compute: axis 0 is the
    request's rows; another dynamic axis takes the size of the inputs' same dynamic axis (a sequence length),
    else 1 (the answer is checked again, exactly, once computed: `sizes_of`)."""
    shapes = {name: a.shape for name, a in declared.items()}
    rows = next(iter(shapes.values()))[0]
    sizes = {}
    for spec in engine.outputs:
        shape = (rows, *[d if d != -1 else _dynamic(axis + 1, shapes, engine.inputs)
                         for axis, d in enumerate(spec.shape[1:])])
        count = math.prod(shape)
        sizes[spec.name] = Size(shape, count * spec.dtype.itemsize, count * JSON_CHARS.get(spec.dtype.kind, 16))
    return sizes


def sizes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, Size]:
    """The sizes of computed outputs."""
    return {name: Size(a.shape, a.nbytes, a.size * JSON_CHARS.get(a.dtype.kind, 16)) for name, a in arrays.items()}


def _dynamic(axis: int, shapes: Mapping[str, tuple[int, ...]], inputs: Sequence[TensorSpec]) -> int:
    sizes = [shapes[s.name][axis] for s in inputs
             if s.name in shapes and axis < len(s.shape) and s.shape[axis] == -1 and axis < len(shapes[s.name])]
    return max(sizes, default=1)


def check_request(specs: Sequence[TensorSpec], constraints: Sequence[InputConstraint],
                  arrays: Mapping[str, np.ndarray]) -> int:
    """Raise InputError unless `arrays` is a request this engine can run; return its row count."""
    check_inputs(list(specs), arrays)
    for constraint in constraints:
        if constraint.name in arrays:
            check_constraint(constraint, arrays)
    return next(iter(arrays.values())).shape[0]


def check_constraint(c: InputConstraint, arrays: Mapping[str, np.ndarray], values: bool = True) -> None:
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
    if values and array.size and (c.min_value is not None or c.max_value is not None):
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
