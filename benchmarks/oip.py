"""A small Open Inference Protocol v2 codec (JSON and Triton's binary tensor extension), both directions.

The load generator encodes requests and decodes responses with it; the peer servers (plain FastAPI,
LitServe) decode requests and encode responses with it, so every server under test receives the same
bytes. Binary body = JSON header, then each binary tensor's raw little-endian bytes in the order the
tensors appear in the header; the header's length travels in `Inference-Header-Content-Length`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from engines.base import datatype_of, numpy_dtype

HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """A body that is not a well-formed OIP v2 request or response."""


def tensor_entry(name: str, array: np.ndarray, binary: bool) -> tuple[dict, bytes]:
    entry: dict = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype)}
    if binary:
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = array.reshape(-1).tolist()
    return entry, b""


def _encode(header: dict, key: str, tensors: Mapping[str, np.ndarray], binary: bool) -> tuple[bytes, dict]:
    entries, blobs = [], []
    for name, array in tensors.items():
        entry, raw = tensor_entry(name, np.asarray(array), binary)
        entries.append(entry)
        blobs.append(raw)
    header = {**header, key: entries}
    text = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return text, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
    return text + b"".join(blobs), headers


def encode_request(inputs: Mapping[str, np.ndarray], *, binary: bool) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request; binary=True also asks for binary outputs."""
    header = {"parameters": {"binary_data_output": True}} if binary else {}
    return _encode(header, "inputs", inputs, binary)


def encode_response(model: str, outputs: Mapping[str, np.ndarray], *, binary: bool) -> tuple[bytes, dict]:
    return _encode({"model_name": model}, "outputs", outputs, binary)


def _decode(body: bytes, header_length: str | None, key: str) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        split = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= split <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except ValueError as exc:
        raise ProtocolError(f"body does not start with a JSON header: {exc}") from None
    return header, tensors_of(header, key, body, split)


def tensors_of(header: dict, key: str, body: bytes = b"", offset: int = 0) -> dict[str, np.ndarray]:
    """The tensors listed under `key` ("inputs"/"outputs"); binary ones are read from body[offset:]."""
    try:
        entries = list(header[key])
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"message has no {key!r} list: {exc}") from None
    tensors = {}
    for entry in entries:
        try:
            name, dtype, shape = entry["name"], numpy_dtype(entry["datatype"]), tuple(entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed tensor entry {entry!r}: {exc}") from None
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(entry.get("data"), dtype=dtype)
        else:
            if offset + size > len(body):
                raise ProtocolError(f"tensor {name!r}: body ends before its {size} bytes")
            array = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=size // dtype.itemsize, offset=offset)
            offset += size
        try:
            tensors[name] = array.reshape(shape).astype(dtype, copy=False)
        except ValueError:
            raise ProtocolError(f"tensor {name!r}: {array.size} elements do not fit shape {shape}") from None
    return tensors


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, inputs) of an infer request body; header tells whether binary outputs were asked for."""
    return _decode(body, header_length, "inputs")


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    return _decode(body, header_length, "outputs")[1]


def wants_binary(header: dict) -> bool:
    return bool((header.get("parameters") or {}).get("binary_data_output"))


def random_inputs(specs: list[dict], batch: int, *, seed: int = 0, vocab: int = 1000) -> dict[str, np.ndarray]:
    """Inputs for OIP tensor metadata (`{"name","datatype","shape"}`, -1 = dynamic; axis 0 the batch).

    Floats are standard normal; integers (token ids) are drawn below `vocab`, masks named
    `*mask*` are all ones. Other dynamic axes must be fixed by the caller's specs.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [batch] + [int(d) for d in spec["shape"][1:]]
        if any(d < 0 for d in shape):
            raise ValueError(f"input {spec['name']!r} has a dynamic axis besides the batch: {spec['shape']}")
        dtype = numpy_dtype(spec["datatype"])
        if np.issubdtype(dtype, np.floating):
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in spec["name"]:
            out[spec["name"]] = np.ones(shape, dtype=dtype)
        else:
            out[spec["name"]] = rng.integers(0, vocab, shape).astype(dtype)
    return out
