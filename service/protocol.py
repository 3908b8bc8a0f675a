"""Open Inference Protocol v2 request/response models and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by raw little-endian tensor bytes: the header's length is
given by `Inference-Header-Content-Length`, and each binary input says its byte count in
`parameters.binary_data_size`, in the order the inputs appear. Responses use the same scheme for outputs
asked for as binary (`binary_data` per output, `binary_data_output` for all).
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from engines.base import DATATYPES, numpy_dtype

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**31 - 1  # one dimension of a tensor (Triton's dims are int32-sized too)
MAX_TENSOR_BYTES = 2**62  # nonzero dimensions x item size: beyond this numpy cannot even describe an empty array
MAX_TIMEOUT_US = 2**53  # a request timeout, in microseconds (exact as a float; about 285 years)
Parameters = dict[str, Any]


class ProtocolError(ValueError):
    """The body cannot be decoded: malformed JSON, a truncated or inconsistent binary section."""


class SchemaError(ValueError):
    """The JSON decodes but is not an inference request (422)."""


class RequestInput(BaseModel):
    name: str
    shape: list[int] = Field(description="full shape including the batch axis")
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = Field(None, description="row-major values, flat or nested; absent when sent as binary")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    # normfuse's addition (OIP clients ignore unknown keys): whether this version computes the same function as
    # unfused; false for a lossy variant (int8), served only after passing its accuracy gate
    parameters: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: str


# -- decoding ------------------------------------------------------------------------------------
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate = zlib format, as tritonclient sends


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding` (gzip, deflate, identity); ValueError("too large") past `limit` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise OverflowError(f"decompressed request body exceeds the limit of {limit} bytes")
    return out


def decode_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """Split a (possibly binary) body into the JSON request and its input arrays, checking every length."""
    if header_length is None:
        head, blob = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if size == 0:
            raise ProtocolError(f"{HEADER_LENGTH}: 0 (a raw binary request) is not supported; send a JSON header")
        if not 0 < size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {size} but the body has only {len(body)} bytes")
        head, blob = body[:size], body[size:]
    try:
        raw = json.loads(head)
    except RecursionError:
        raise ProtocolError("request body is nested too deeply to be an inference request") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length else f" (binary tensors need the {HEADER_LENGTH} header)"
        raise ProtocolError(f"request body is not valid JSON: {exc}{hint}") from None
    except ValueError as exc:  # an integer literal of more than 4300 digits
        raise ProtocolError(f"request body holds a number that cannot be read: {exc}") from None
    try:
        request = InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise SchemaError(f"not an inference request: {_first_error(exc)}") from None
    return request, _decode_inputs(request, memoryview(blob))


def _decode_inputs(request: InferenceRequest, blob: memoryview) -> dict[str, np.ndarray]:
    arrays, cursor = {}, 0
    for item in request.inputs:
        if item.name in arrays:
            raise ProtocolError(f"input {item.name!r} is given twice")
        if any(d < 0 for d in item.shape):
            raise ProtocolError(f"input {item.name!r}: shape {_short(item.shape)} has a negative dimension")
        if any(d > MAX_DIM for d in item.shape):
            raise ProtocolError(f"input {item.name!r}: shape {_short(item.shape)} has a dimension above {MAX_DIM}")
        try:
            dtype = numpy_dtype(item.datatype)
        except ValueError as exc:
            raise ProtocolError(f"input {item.name!r}: {exc}") from None
        if math.prod(d for d in item.shape if d) * dtype.itemsize > MAX_TENSOR_BYTES:
            raise ProtocolError(f"input {item.name!r}: shape {_short(item.shape)} of {item.datatype} is too large "
                                f"to describe (over {MAX_TENSOR_BYTES} bytes, counting nonzero dimensions)")
        count = math.prod(item.shape)
        nbytes = item.parameters.get("binary_data_size")
        if nbytes is not None:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise ProtocolError(f"input {item.name!r}: binary_data_size must be a non-negative integer")
            if nbytes != count * dtype.itemsize:
                raise ProtocolError(f"input {item.name!r}: binary_data_size is {nbytes} bytes but {item.datatype} "
                                    f"{item.shape} needs {count * dtype.itemsize}")
            if cursor + nbytes > len(blob):
                raise ProtocolError(f"input {item.name!r}: binary body truncated: needs {nbytes} bytes at offset "
                                    f"{cursor}, {len(blob) - cursor} left")
            array = np.frombuffer(blob[cursor : cursor + nbytes], dtype=dtype.newbyteorder("<")).astype(dtype)
            cursor += nbytes
        else:
            array = _from_json(item, dtype, count)
        arrays[item.name] = array.reshape(item.shape)
    if cursor != len(blob):
        raise ProtocolError(f"binary body has {len(blob) - cursor} bytes beyond what the inputs' binary_data_size declare")
    return arrays


def _from_json(item: RequestInput, dtype: np.dtype, count: int) -> np.ndarray:
    if item.data is None:
        raise ProtocolError(f"input {item.name!r}: no 'data' and no binary_data_size parameter")
    what = f"input {item.name!r}: data is not a regular array of {item.datatype}"
    try:
        raw = np.asarray(item.data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    if raw.dtype.kind not in "biuf":  # strings, nulls, objects, integers beyond 64 bits
        raise ProtocolError(f"{what}: it holds values that are not numbers of at most 64 bits "
                            f"(e.g. {raw.reshape(-1)[:1].tolist()})")
    if dtype.kind in "iu" and raw.size:
        if raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
            raise ProtocolError(f"{what}: it holds fractional values")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{what}: values must lie in [{info.min}, {info.max}]")
    array = raw.astype(dtype).reshape(-1)
    if array.size != count:
        raise ProtocolError(f"input {item.name!r}: shape {item.shape} needs {count} values, data has {array.size}")
    return array


def _short(shape: list[int]) -> str:
    text = "[" + ", ".join(_shown(d) for d in shape[:8]) + (", ...]" if len(shape) > 8 else "]")
    return text if len(text) <= 120 else text[:117] + "..."


def _shown(value: Any) -> str:
    """repr for an error message, short even for huge integers or containers."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def timeout_of(parameters: Parameters) -> float | None:
    """Triton's per-request `timeout` parameter: microseconds in the queue; 0 or absent = none."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMEOUT_US:
        shown = _shown(value)
        raise ProtocolError(f"parameter 'timeout' must be an integer number of microseconds in [0, {MAX_TIMEOUT_US}], "
                            f"got {shown}")
    return value / 1e6 if value else None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


# -- encoding ------------------------------------------------------------------------------------
def encode_response(
    response: InferenceResponse, arrays: dict[str, np.ndarray], binary: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """JSON (+ binary blobs, in output order) for `response`, whose outputs carry no data yet."""
    return encode_body(response.model_dump(exclude_none=True), arrays, binary)


def encode_body(body: dict[str, Any], arrays: dict[str, np.ndarray], binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """`encode_response` for a response already as a dict (InferenceResponse's fields, in order, None left out):
    what the infer route uses, skipping the pydantic model on the hot path. Its outputs are filled in place."""
    blobs = []
    for out in body["outputs"]:
        array = arrays[out["name"]]
        if binary.get(out["name"]):
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {**out.get("parameters", {}), "binary_data_size": len(data)}
            blobs.append(data)
        else:
            out["data"] = _json_values(array)
    head = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def _json_values(array: np.ndarray) -> list:
    """Flat values for a JSON output. JSON has no NaN or Infinity: those become the strings "NaN", "Infinity" and
    "-Infinity" (what `float()` and `np.array(..., dtype=float32)` read back), so the body stays strict JSON."""
    flat = array.reshape(-1)
    values = flat.tolist()
    if flat.dtype.kind == "f":
        for i in np.flatnonzero(~np.isfinite(flat)).tolist():
            v = values[i]
            values[i] = "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return values


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


def flag(parameters: Parameters, key: str, default: bool, where: str) -> bool:
    """A boolean parameter: JSON true/false only ("false" is not false, and 0 is not a boolean)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be a JSON boolean (true or false), got {_shown(value)}")
    return value


DATATYPE_NAMES = list(DATATYPES)
