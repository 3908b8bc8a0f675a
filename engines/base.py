"""The engine interface every backend implements: load / infer / close, with input and output specs.

An engine runs one variant of one model. Constructors only store paths and options; `load()` does the
heavy work. `infer` takes and returns numpy arrays keyed by tensor name, batch-first. Inputs are checked
where they enter (`check_inputs`) and a bad one raises `InputError` naming what arrived and what was
expected, e.g. "input 'pixels': got float16 (3, 512), expected FP32 (-1, 512)".
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Open Inference Protocol v2 datatype names <-> numpy dtypes (BYTES is not used by our models).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype | type) -> str:
    """OIP v2 datatype name of a numpy dtype ("FP32" for float32)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no Open Inference Protocol datatype") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """numpy dtype of an OIP v2 datatype name; ValueError for an unknown name."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}") from None


class EngineError(RuntimeError):
    """An engine failed to load or run (not the caller's fault)."""


class InputError(ValueError):
    """The caller's inputs do not match the engine's input specs."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, OIP datatype and shape of one input or output; -1 marks a dynamic axis (axis 0 is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)

    def describe(self) -> str:
        return f"{self.datatype} {tuple(self.shape)}"

    def check(self, array: np.ndarray, *, what: str = "input") -> None:
        """Raise InputError unless `array` has this spec's dtype, rank and fixed dimensions."""
        got = f"got {datatype_of(array.dtype) if array.dtype in _NAMES else array.dtype} {tuple(array.shape)}"
        expected = f"expected {self.describe()}"
        if array.dtype != self.dtype:
            raise InputError(f"{what} {self.name!r}: {got}, {expected} (wrong datatype)")
        if array.ndim != len(self.shape):
            raise InputError(f"{what} {self.name!r}: {got}, {expected} (wrong number of dimensions)")
        for axis, (have, want) in enumerate(zip(array.shape, self.shape, strict=True)):
            if want != -1 and have != want:
                raise InputError(f"{what} {self.name!r}: {got}, {expected} (dimension {axis} must be {want})")
        if array.ndim and array.shape[0] == 0:
            raise InputError(f"{what} {self.name!r}: {got}, {expected} (empty batch)")


def check_inputs(specs: list[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Check names, dtypes, shapes, and that every input has the same batch size."""
    expected = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        if missing:
            parts.append(f"missing input(s) {missing}")
        listing = ", ".join(f"{s.name!r} {s.describe()}" for s in specs)
        raise InputError(f"{'; '.join(parts)}; expected inputs: {listing}")
    batches = set()
    for spec in specs:
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InputError(f"input {spec.name!r}: got {type(array).__name__}, expected a numpy array")
        spec.check(array)
        batches.add(array.shape[0])
    if len(batches) > 1:
        raise InputError(f"inputs disagree on the batch size (axis 0): {sorted(batches)}")


class Engine(abc.ABC):
    """One variant of one model, ready to run batches. Use as a context manager or call load()/close()."""

    #: short backend name used in metrics labels and the manifest: "onnxruntime", "tensorrt", "torch"
    backend: str = ""

    def __init__(self) -> None:
        self._inputs: list[TensorSpec] | None = None
        self._outputs: list[TensorSpec] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> Engine:
        """Do the heavy work (open the session / deserialize the plan); set the specs; return self."""

    @abc.abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch of already-checked inputs."""

    def close(self) -> None:
        """Release the backend's resources. Safe to call twice."""

    def __enter__(self) -> Engine:
        return self if self.loaded else self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata --------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._inputs is not None

    @property
    def inputs(self) -> list[TensorSpec]:
        if self._inputs is None:
            raise EngineError(f"{type(self).__name__} is not loaded; call load() first")
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        if self._outputs is None:
            raise EngineError(f"{type(self).__name__} is not loaded; call load() first")
        return self._outputs

    #: the largest batch one infer() call accepts (None: unbounded); the batcher splits larger ones
    max_batch_size: int | None = None

    #: batches infer() runs at once from different threads (OpenVINO: its infer requests, one per stream); the
    #: batcher keeps this many in flight. 1 for the others: one ONNX Runtime session shares one intra-op thread
    #: pool between concurrent runs (they would contend, not overlap), and a TensorRT engine has one context.
    parallelism: int = 1

    def describe(self) -> dict[str, str]:
        """Provenance for metrics/info labels: runtime, version, precision, device."""
        return {"runtime": self.backend}

    # -- running ---------------------------------------------------------------------------------
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `inputs` against the specs, run them, return outputs keyed by name."""
        specs = self.inputs
        check_inputs(specs, inputs)
        if self.max_batch_size is not None:
            batch = next(iter(inputs.values())).shape[0]
            if batch > self.max_batch_size:
                raise InputError(f"batch of {batch} exceeds this engine's maximum of {self.max_batch_size}")
        return self._run(dict(inputs))
