"""The server's own response models (metadata, errors). The codec and the request/response bodies live in
`oip` (shared with the benchmarks); their names are re-exported here for the server's modules."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from oip.codec import (  # noqa: F401 - re-exported
    HEADER_LENGTH,
    ProtocolError,
    SchemaError,
    decode_request,
    decompress,
    encode_body,
    encode_response,
    read_request,
    request_arrays,
)
from oip.parameters import binary_choices, flag, priority_of, timeout_of  # noqa: F401 - re-exported
from oip.schema import (  # noqa: F401 - re-exported
    InferenceRequest,
    InferenceResponse,
    RequestInput,
    RequestOutput,
    ResponseOutput,
)


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
