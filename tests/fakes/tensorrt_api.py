"""The parts of TensorRT's Python API that both the builder and the runtime fakes need.

Only what the real 10.x / 11.x API has: a fake grows a name when the real module has it, never otherwise,
so code touching a removed name fails here as it would on a GPU host.
"""

from __future__ import annotations

import enum


class Severity(enum.Enum):
    """`trt.ILogger.Severity`."""

    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    """`trt.ILogger`: subclasses implement `log(severity, msg)`."""

    Severity = Severity

    def __init__(self) -> None:
        pass
