"""Open Inference Protocol v2 bodies <-> numpy arrays: JSON and Triton's binary tensor extension, both directions.

A body is a JSON header, optionally followed by raw little-endian tensor bytes: the header's length is given by
`Inference-Header-Content-Length`, and each binary tensor says its byte count in `parameters.binary_data_size`,
in the order the tensors appear. The same strict decoder reads requests (the server, the peer servers) and
responses (the load generator): every length is checked, and a bad body raises `ProtocolError` (malformed) or
`SchemaError` (valid JSON, but not an inference request/response) with a message saying what was wrong.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from engines.base import datatype_of, numpy_dtype
from oip.schema import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**31 - 1  # one dimension of a tensor (Triton's dims are int32-sized too)
MAX_TENSOR_BYTES = 2**62  # nonzero dimensions x item size: beyond this numpy cannot even describe an empty array


def _numpy_max_dims() -> int:
    """numpy's own limit on an array's dimensions, asked rather than assumed: 32 in numpy 1, 64 in numpy 2."""
    for dims in (64, 32):
        try:
            np.empty((1,) * dims, np.uint8)
        except ValueError:  # "maximum supported dimension for an ndarray is 32, found 64"
            continue
        return dims
    return 32


MAX_DIMS = _numpy_max_dims()  # dimensions of a tensor: more would be numpy's ValueError deep in a check


class ProtocolError(ValueError):
    """The body cannot be decoded: malformed JSON, a truncated or inconsistent binary section."""


class SchemaError(ValueError):
    """The JSON decodes but is not an inference request (422)."""


# -- decoding ------------------------------------------------------------------------------------
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate = zlib format, as tritonclient sends


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding` (gzip, deflate, identity); OverflowError past `limit` bytes."""
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


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(parsed JSON header, binary rest) of a body, checking `Inference-Header-Content-Length`."""
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
    return _parsed(head, header_length), memoryview(blob)


def _parsed(head: bytes, header_length: str | None) -> Any:
    """The JSON header through orjson (the standard parser, holding the GIL ~4x longer, stalls the event loop under
    a flood); what orjson refuses is read again by the standard parser, which takes what it takes (integers beyond
    64 bits, NaN) and words the errors (this costs time only for bodies that are odd or malformed)."""
    try:
        raw = orjson.loads(head)
        if not _float_dims(raw):  # orjson reads an integer beyond 64 bits as a float: let the shape check see it
            return raw
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson follows at most 1024 levels
            raise ProtocolError("body is nested too deeply to be an inference message") from None
    try:
        return json.loads(head)
    except RecursionError:
        raise ProtocolError("body is nested too deeply to be an inference message") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length else f" (binary tensors need the {HEADER_LENGTH} header)"
        raise ProtocolError(f"body is not valid JSON: {exc}{hint}") from None
    except ValueError as exc:  # an integer literal of more than 4300 digits
        raise ProtocolError(f"body holds a number that cannot be read: {exc}") from None


def _float_dims(raw: Any) -> bool:
    tensors = raw.get("inputs") or raw.get("outputs") if isinstance(raw, dict) else None
    return isinstance(tensors, list) and any(
        isinstance(t, dict) and isinstance(t.get("shape"), list) and any(isinstance(d, float) for d in t["shape"])
        for t in tensors)


def _validated(model: type[BaseModel], raw: Any, what: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "body"
        raise SchemaError(f"not an inference {what}: {where}: {err['msg']}") from None


def decode_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """Split a (possibly binary) request body into the JSON request and its input arrays."""
    request, blob = read_request(body, header_length)
    return request, request_arrays(request, blob)


def read_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, memoryview]:
    """The request's JSON header, validated, and the binary rest: nothing decoded into arrays yet, so that the
    caller can check names, shapes and sizes first (`request_arrays` then decodes)."""
    raw, blob = split_body(body, header_length)
    return _validated(InferenceRequest, raw, "request"), blob


def request_arrays(request: InferenceRequest, blob: memoryview = memoryview(b"")) -> dict[str, np.ndarray]:
    """The input arrays of a request read by `read_request` (or `request_header`)."""
    return decode_tensors(request.inputs, blob, "input")


def request_header(raw: Any) -> InferenceRequest:
    """An already-parsed JSON header (e.g. built from a gRPC message) as a validated request."""
    return _validated(InferenceRequest, raw, "request")


def request_from_json(raw: Any, blob: memoryview = memoryview(b"")) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """The request and its input arrays from an already-parsed JSON header (and the binary rest)."""
    request = _validated(InferenceRequest, raw, "request")
    return request, decode_tensors(request.inputs, blob, "input")


def decode_response(body: bytes, header_length: str | None) -> tuple[InferenceResponse, dict[str, np.ndarray]]:
    """A response body (JSON or binary), as strictly as requests are read."""
    raw, blob = split_body(body, header_length)
    response = _validated(InferenceResponse, raw, "response")
    return response, decode_tensors(response.outputs, blob, "output")


def decode_tensors(items: list[RequestInput] | list[ResponseOutput], blob: memoryview, what: str
                   ) -> dict[str, np.ndarray]:
    """Arrays of the listed tensors; binary ones are read from `blob` in order, which they must use up exactly."""
    arrays, cursor = {}, 0
    for item in items:
        if item.name in arrays:
            raise ProtocolError(f"{what} {item.name!r} is given twice")
        dtype = checked_dtype(item, what)
        count = math.prod(item.shape)
        nbytes = (item.parameters or {}).get("binary_data_size")
        if nbytes is not None:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise ProtocolError(f"{what} {item.name!r}: binary_data_size must be a non-negative integer")
            if nbytes != count * dtype.itemsize:
                raise ProtocolError(f"{what} {item.name!r}: binary_data_size is {nbytes} bytes but {item.datatype} "
                                    f"{item.shape} needs {count * dtype.itemsize}")
            if cursor + nbytes > len(blob):
                raise ProtocolError(f"{what} {item.name!r}: binary body truncated: needs {nbytes} bytes at offset "
                                    f"{cursor}, {len(blob) - cursor} left")
            array = np.frombuffer(blob[cursor : cursor + nbytes], dtype=dtype.newbyteorder("<")).astype(dtype)
            cursor += nbytes
        else:
            array = _from_json(item, dtype, count, what)
        try:
            arrays[item.name] = array.reshape(item.shape)
        except ValueError as exc:  # never expected after the checks above; a client's input is never a 500
            raise ProtocolError(f"{what} {item.name!r}: cannot take shape {_short(item.shape)}: {exc}") from None
    if cursor != len(blob):
        raise ProtocolError(f"binary body has {len(blob) - cursor} bytes beyond what the binary_data_size "
                            f"parameters declare")
    return arrays


def checked_dtype(item: RequestInput | ResponseOutput, what: str) -> np.dtype:
    """The numpy dtype of a tensor whose datatype and shape are sane (ProtocolError otherwise)."""
    if len(item.shape) > MAX_DIMS:
        raise ProtocolError(f"{what} {item.name!r}: shape has {len(item.shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in item.shape):
        raise ProtocolError(f"{what} {item.name!r}: shape {_short(item.shape)} has a negative dimension")
    if any(d > MAX_DIM for d in item.shape):
        raise ProtocolError(f"{what} {item.name!r}: shape {_short(item.shape)} has a dimension above {MAX_DIM}")
    try:
        dtype = numpy_dtype(item.datatype)
    except ValueError as exc:
        raise ProtocolError(f"{what} {item.name!r}: {exc}") from None
    if math.prod(d for d in item.shape if d) * dtype.itemsize > MAX_TENSOR_BYTES:
        raise ProtocolError(f"{what} {item.name!r}: shape {_short(item.shape)} of {item.datatype} is too large "
                            f"to describe (over {MAX_TENSOR_BYTES} bytes, counting nonzero dimensions)")
    return dtype


def _from_json(item: RequestInput | ResponseOutput, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    if item.data is None:
        raise ProtocolError(f"{what} {item.name!r}: no 'data' and no binary_data_size parameter")
    bad = f"{what} {item.name!r}: data is not a regular array of {item.datatype}"
    try:
        raw = np.asarray(item.data)
        if dtype.kind == "f" and raw.dtype.kind in "UO":  # strings among the values: "NaN", "Infinity"?
            raw = np.asarray(_finite_names(item.data))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"{bad}: {exc}") from None
    if raw.dtype.kind not in "biuf":  # strings, nulls, objects, integers beyond 64 bits
        raise ProtocolError(f"{bad}: it holds values that are not numbers of at most 64 bits "
                            f"(e.g. {raw.reshape(-1)[:1].tolist()})")
    if dtype.kind in "iu" and raw.size:
        if raw.dtype.kind == "f" and np.abs(raw).max() >= 2.0**64:  # the JSON parser reads such integers as floats
            raise ProtocolError(f"{bad}: it holds values that are not numbers of at most 64 bits")
        if raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
            raise ProtocolError(f"{bad}: it holds fractional values")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{bad}: values must lie in [{info.min}, {info.max}]")
    array = raw.astype(dtype).reshape(-1)
    if array.size != count:
        raise ProtocolError(f"{what} {item.name!r}: shape {item.shape} needs {count} values, data has {array.size}")
    return array


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_names(data: Any) -> Any:
    """The strings "NaN", "Infinity", "-Infinity" that `_json_values` writes, read back as floats (flat lists
    only: that is all the encoder writes; nested data is left to numpy, which refuses strings)."""
    if isinstance(data, list) and any(isinstance(v, str) for v in data):
        return [_NON_FINITE.get(v, v) if isinstance(v, str) else v for v in data]
    return data


def _short(shape: list[int]) -> str:
    text = "[" + ", ".join(shown(d) for d in shape[:8]) + (", ...]" if len(shape) > 8 else "]")
    return text if len(text) <= 120 else text[:117] + "..."


def shown(value: Any) -> str:
    """repr for an error message, short even for huge integers or containers."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- encoding ------------------------------------------------------------------------------------
def encode_response(
    response: InferenceResponse, arrays: dict[str, np.ndarray], binary: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """JSON (+ binary blobs, in output order) for `response`, whose outputs carry no data yet."""
    return encode_body(response.model_dump(exclude_none=True), arrays, binary)


def encode_body(body: dict[str, Any], arrays: Mapping[str, np.ndarray], binary: Mapping[str, bool], *,
                key: str = "outputs") -> tuple[bytes, dict[str, str]]:
    """`body` (a request or response as a dict, its `key` tensors listed without data) with each tensor's values
    filled in place: as JSON `data`, or as binary after the header. Returns (bytes, headers)."""
    blobs = []
    for entry in body[key]:
        array = arrays[entry["name"]]
        if binary.get(entry["name"]):
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _json_values(array)
    head = orjson.dumps(body)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def encode_request(inputs: Mapping[str, np.ndarray], *, binary: bool, parameters: dict | None = None
                   ) -> tuple[bytes, dict[str, str]]:
    """A client's infer request body and headers; binary=True sends binary inputs and asks for binary outputs."""
    body: dict[str, Any] = {"parameters": {"binary_data_output": True, **(parameters or {})}} if binary else (
        {"parameters": dict(parameters)} if parameters else {})
    body["inputs"] = [_entry(name, np.asarray(a)) for name, a in inputs.items()]
    return encode_body(body, {k: np.asarray(v) for k, v in inputs.items()}, dict.fromkeys(inputs, binary),
                       key="inputs")


def encode_outputs(model: str, outputs: Mapping[str, np.ndarray], *, binary: bool,
                   version: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A response body with every output, all binary or all JSON (the peer servers' answer)."""
    body: dict[str, Any] = {"model_name": model, **({"model_version": version} if version else {})}
    body["outputs"] = [_entry(name, np.asarray(a)) for name, a in outputs.items()]
    return encode_body(body, outputs, dict.fromkeys(outputs, binary))


def _entry(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype)}


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
