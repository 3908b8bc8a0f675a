"""ONNX Runtime engine: one InferenceSession per variant, CPU by default.

Given an engines.manifest.Artifact (what engines.load passes), the session is built from the bytes that were
hashed, never from a second read by path; external data comes only from the manifest's `onnx_data` artifact
(handed over in memory), and any other external reference fails instead of reading a file beside the model or
in the working directory.

CUDA and TensorRT execution providers are used only when asked for (`providers=[...]`) and present in the
installed onnxruntime build; asking for one that is absent is an EngineError rather than a silent CPU
fallback, so a benchmark never mislabels what it measured.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError, InputError, TensorSpec
from engines.manifest import Artifact, ManifestError

log = logging.getLogger(__name__)

# ONNX tensor type strings as ORT reports them -> OIP v2 datatype names
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_SHORT = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def spec_of(arg) -> TensorSpec:
    """TensorSpec of an ORT NodeArg: symbolic or unknown dimensions become -1."""
    try:
        datatype = _ORT_TYPES[arg.type]
    except KeyError:
        raise EngineError(f"tensor {arg.name!r} has type {arg.type}, which normfuse engines do not serve") from None
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def resolve_providers(providers: list | None) -> list:
    """Full ORT provider names (short names 'cpu', 'cuda', 'tensorrt' accepted); CPU always last."""
    import onnxruntime as ort

    if not providers:
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    resolved = []
    for entry in providers:
        name, options = (entry if isinstance(entry, tuple) else (entry, None))
        name = _SHORT.get(name, name)
        if name not in available:
            raise EngineError(
                f"execution provider {name} is not available in this onnxruntime build "
                f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu for CUDA/TensorRT"
            )
        resolved.append((name, options) if options else name)
    if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in resolved]:
        resolved.append("CPUExecutionProvider")
    return resolved


class OnnxRuntimeEngine(Engine):
    """Run an ONNX file in ONNX Runtime. `optimization`: disable | basic | extended | layout | all;
    `allow_spinning` (default False) lets ORT's pool threads busy-wait between runs."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path | Artifact,
        *,
        external_data: Artifact | None = None,
        providers: list | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        optimization: str = "all",
        optimized_model_path: str | Path | None = None,
        allow_spinning: bool = False,
    ) -> None:
        super().__init__()
        if optimization not in _LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(_LEVELS)}, got {optimization!r}")
        self.artifact = None if isinstance(path, str | Path) else path  # an Artifact: load its verified bytes
        self.path = Path(path) if self.artifact is None else self.artifact.path
        self.external_data = external_data
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.optimization = optimization
        self.optimized_model_path = optimized_model_path  # where ORT dumps its optimized graph (op census)
        # ORT's pool threads spin-wait for work by default: several sessions (variants, shadow runs) on a few
        # cores then burn each other's CPU and skew timings. Off unless asked for (one session per machine).
        self.allow_spinning = allow_spinning
        self.session_options = None  # the SessionOptions the session was built with (after load)
        self._session = None

    def load(self) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        if self.artifact is None and not self.path.is_file():
            raise EngineError(f"ONNX file {self.path} does not exist")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.optimization])
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        if self.optimized_model_path is not None:
            options.optimized_model_filepath = str(self.optimized_model_path)
        options.log_severity_level = 3  # errors only: ORT warns about hardware-specific optimized dumps
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.session_options = options
        try:
            self._session = self._new_session(ort, options)
        except (EngineError, ManifestError):  # a sha256 mismatch says so itself
            raise
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"ONNX Runtime could not load {self.path}: {exc}") from exc
        self._inputs = [spec_of(arg) for arg in self._session.get_inputs()]
        self._outputs = [spec_of(arg) for arg in self._session.get_outputs()]
        log.info("loaded %s with %s", self.path, self._session.get_providers())
        return self

    def _new_session(self, ort, options):
        providers = resolve_providers(self.providers)
        if self.artifact is None:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        model = self.artifact.read()
        if self.external_data is not None:  # under the name the graph's initializers reference, relative to it
            name = self.external_data.path.relative_to(self.path.parent).as_posix()
            data = self.external_data.read()
            options.add_external_initializers_from_files_in_memory([name], [data], [len(data)])
        # any other external reference resolves in an empty directory (ORT would look in the working directory)
        with tempfile.TemporaryDirectory(prefix="normfuse-no-external-") as empty:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
            return ort.InferenceSession(model, sess_options=options, providers=providers)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("OnnxRuntimeEngine is closed")
        names = [spec.name for spec in self.outputs]
        try:
            arrays = self._session.run(names, inputs)
        except Exception as exc:
            if type(exc).__name__ == "InvalidArgument":  # the request's values, e.g. an index past a table
                shapes = ", ".join(f"{k!r} {tuple(v.shape)}" for k, v in inputs.items())
                raise InputError(f"the model refused the values of input(s) {shapes}: "
                                 f"{str(exc).rsplit('Status Message: ', 1)[-1].strip()}") from exc
            raise EngineError(f"ONNX Runtime failed on {self.path.name}: {exc}") from exc
        return dict(zip(names, arrays, strict=True))

    def close(self) -> None:
        self._session = None
        self._inputs = self._outputs = None

    def describe(self) -> dict[str, str]:
        import onnxruntime as ort

        providers = self._session.get_providers() if self._session is not None else resolve_providers(self.providers)
        names = [p if isinstance(p, str) else p[0] for p in providers]
        floats = [s.datatype for s in (self._outputs or []) if s.datatype.startswith("FP")]
        return {
            "runtime": self.backend,
            "version": ort.__version__,
            "providers": ",".join(names),
            "device": "cpu" if names[0] == "CPUExecutionProvider" else "cuda",
            "precision": floats[0].lower() if floats else "unknown",
            "optimization": self.optimization,
            "spinning": "on" if self.allow_spinning else "off",
        }
