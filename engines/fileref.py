"""A file a manifest lists: where it lies (relative to the model's directory, never outside it), its sha256 and size.

A leaf module: the manifest (variants' files, TensorRT plans) and the plan schema (an OpenVINO plan's own IR)
both record files with it, and a path that could leave the model's directory fails to parse.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FileRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the model's directory, '/'-separated, without '..'")
    sha256: str
    bytes: int

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        parts = value.split("/")
        if not value or value.startswith("/") or "\\" in value or "\0" in value or ":" in parts[0] \
                or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"file path {value!r} must be relative to the model's directory, '/'-separated, "
                             "without '..', '.', empty parts or a drive")
        return value
