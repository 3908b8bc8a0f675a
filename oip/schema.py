"""Open Inference Protocol v2 request and response bodies, as pydantic models (the JSON part of a body)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Parameters = dict[str, Any]


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
