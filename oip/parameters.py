"""The request parameters the server reads: binary outputs, the queue timeout and the priority (Triton's
binary tensor and schedule policy extensions). Each rejects a value of the wrong type with `ProtocolError`."""

from __future__ import annotations

from typing import Any

from oip.codec import ProtocolError, shown
from oip.schema import InferenceRequest

Parameters = dict[str, Any]
MAX_TIMEOUT_US = 2**53  # a request timeout, in microseconds (exact as a float; about 285 years)
MAX_PRIORITY = 2**31 - 1


def flag(parameters: Parameters, key: str, default: bool, where: str) -> bool:
    """A boolean parameter: JSON true/false only ("false" is not false, and 0 is not a boolean)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be a JSON boolean (true or false), got {shown(value)}")
    return value


def _integer(parameters: Parameters, key: str, limit: int, unit: str) -> int | None:
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ProtocolError(f"parameter {key!r} must be an integer{unit} in [0, {limit}], got {shown(value)}")
    return value


def timeout_of(parameters: Parameters) -> float | None:
    """Triton's per-request `timeout` parameter: microseconds in the queue, as seconds; 0 or absent = none."""
    value = _integer(parameters, "timeout", MAX_TIMEOUT_US, " number of microseconds")
    return value / 1e6 if value else None


def priority_of(parameters: Parameters) -> int:
    """Triton's per-request `priority` parameter: 1 is the highest; 0 or absent = the default (lowest) level."""
    return _integer(parameters, "priority", MAX_PRIORITY, "") or 0


def binary_choices(request: InferenceRequest, available: list[str]) -> dict[str, bool]:
    """Which outputs to return (all when none are named) and whether each goes back as binary."""
    default = flag(request.parameters, "binary_data_output", False, "parameters.binary_data_output")
    if request.outputs is None:
        return {name: default for name in available}
    unknown = [o.name for o in request.outputs if o.name not in available]
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}; this model's outputs are {available}")
    return {o.name: flag(o.parameters, "binary_data", default, f"outputs[{o.name!r}].parameters.binary_data")
            for o in request.outputs}
