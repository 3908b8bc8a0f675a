"""gRPC inference messages <-> the REST codec's request and arrays, so both protocols decode and validate alike.

A `ModelInferRequest` becomes the JSON header a REST body would carry, its `raw_input_contents` the binary section
(each input's `binary_data_size` is its raw entry's length) and its typed `contents` the JSON `data`; the one
codec (oip.codec.request_header, request_arrays) then reads it with the same checks and messages as REST. Responses carry every
output in `raw_output_contents`, as Triton's gRPC server does.

The messages are the generated ones shipped in `tritonclient[grpc]` (service_pb2, model_config_pb2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from engines.base import DATATYPES
from oip.codec import ProtocolError, request_arrays, request_header
from oip.schema import InferenceRequest

# the typed `contents` field each datatype's values go in (FP16 and BF16 have none: raw only)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameters(mapping) -> dict[str, Any]:
    """A protobuf `map<string, InferParameter>` as the plain dict a JSON request's `parameters` would be."""
    out = {}
    for key, value in mapping.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def decode(request: pb.ModelInferRequest) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """The request as the codec's `InferenceRequest` and its input arrays (ProtocolError, SchemaError)."""
    header, blob = read(request)
    return header, request_arrays(header, blob)


def read(request: pb.ModelInferRequest) -> tuple[InferenceRequest, memoryview]:
    """The request as the codec's `InferenceRequest` (no arrays decoded yet) and its raw contents, joined."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                            "send one per input, in the inputs' order")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        item = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                "parameters": parameters(tensor.parameters)}
        if raw:
            if tensor.HasField("contents"):
                raise ProtocolError(f"input {tensor.name!r}: both contents and raw_input_contents are set; use one")
            item["parameters"]["binary_data_size"] = len(raw[i])
        else:
            item["data"] = _typed_values(tensor)
        inputs.append(item)
    body: dict[str, Any] = {"parameters": parameters(request.parameters), "inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [{"name": o.name, "parameters": parameters(o.parameters)} for o in request.outputs]
    return request_header(body), memoryview(b"".join(raw))


def _typed_values(tensor) -> list:
    """The values of an input sent in typed `contents`, from the field its datatype names."""
    given = [field.name for field, _ in tensor.contents.ListFields()]
    wanted = CONTENTS.get(tensor.datatype)
    if wanted is None and tensor.datatype in DATATYPES:
        raise ProtocolError(f"input {tensor.name!r}: {tensor.datatype} has no typed contents field; "
                            "send it in raw_input_contents")
    if not given:
        where = f"contents.{wanted}" if wanted else "contents"
        raise ProtocolError(f"input {tensor.name!r}: no data: set {where} or raw_input_contents")
    if wanted is not None and given != [wanted]:
        raise ProtocolError(f"input {tensor.name!r}: {tensor.datatype} values go in contents.{wanted}, "
                            f"got {', '.join(given)}")
    return list(getattr(tensor.contents, given[0]))


def encode(model: str, version: str, request_id: str | None, outputs: dict[str, np.ndarray],
           datatypes: dict[str, str]) -> pb.ModelInferResponse:
    """The response: each output's name, datatype and shape, its little-endian bytes in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return response


def message(payload: dict, kind):
    """A JSON-shaped answer of the REST routes (Triton's JSON forms) as the protobuf message `kind`."""
    return json_format.ParseDict(payload, kind())
