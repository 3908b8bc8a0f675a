"""OpenVINO engine: an ONNX file (or OpenVINO IR, `.xml` + `.bin`) compiled for the CPU at one precision.

    OpenVinoEngine(path, precision="bf16", threads=2, streams=1, hint="LATENCY", cache_dir=Path(...)).load()

`precision` is OpenVINO's INFERENCE_PRECISION_HINT: `fp32` (also `f32`: exact, the ONNX graph's own arithmetic),
`bf16` or `f16` (reduced precision, run natively only on AMX / AVX512-BF16 / AVX512-FP16; see engines.cpu). It is
always set explicitly: OpenVINO's own default is bf16 on a CPU with bf16 units, so an unset hint would silently
make an "fp32" engine lossy. An int8 plan is an IR whose quantized layers NNCF wrote; its other ops run at
`precision`.

Compiled models are cached (OpenVINO's CACHE_DIR) under `cache_dir/<files>-<OpenVINO version>-<CPU + properties>`,
where `<files>` digests the sha256 of every file the model is built from (an IR's .xml and .bin, an ONNX file and
its external data): a blob is never reused across changed weights, an upgraded OpenVINO, another CPU or another
precision/hint; a second load of the same files on the same machine imports the blob instead of compiling.

Concurrency: `infer` is thread-safe. It takes an infer request from a pool (OpenVINO's
OPTIMAL_NUMBER_OF_INFER_REQUESTS: one per stream, at least one), so callers on several threads run in parallel on
OpenVINO's streams (THROUGHPUT hint or streams > 1). `parallelism` reports the pool's size, and the server's
batcher keeps that many batches in flight (service.batcher).
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError, TensorSpec
from engines.plans import OPENVINO_HINTS, OPENVINO_PRECISIONS, openvino_config

log = logging.getLogger(__name__)

# OpenVINO element type names -> OIP v2 datatype names
_OV_TYPES = {
    "boolean": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64", "i8": "INT8",
    "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16", "f32": "FP32", "f64": "FP64",
}
PRECISION_HINTS, HINTS = OPENVINO_PRECISIONS, OPENVINO_HINTS  # our precision names -> INFERENCE_PRECISION_HINT


def spec_of(port) -> TensorSpec:
    """TensorSpec of a compiled model's input/output port: dynamic dimensions become -1."""
    name = port.get_any_name()
    kind = port.get_element_type().get_type_name()
    try:
        datatype = _OV_TYPES[kind]
    except KeyError:
        raise EngineError(f"tensor {name!r} has type {kind}, which normfuse engines do not serve") from None
    shape = tuple(-1 if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape())
    return TensorSpec(name, datatype, shape)


def cache_key(sha256s: Sequence[str], version: str, cpu: str, config: dict[str, str] | None = None) -> str:
    """`<files digest[:16]>-<OpenVINO version>-<CPU and properties digest[:8]>`: what a cached compiled blob is valid
    for. `sha256s`: of every file the model is built from, graph first (then .bin weights or ONNX external data);
    `config`: the compile properties (precision and performance hints, threads, streams)."""
    from engines.trt_cache import files_digest

    if not sha256s:
        raise ValueError("a cache key needs the sha256 of at least the model file")
    version = version.split("-")[0]
    machine = cpu + "\n" + "\n".join(f"{k}={v}" for k, v in sorted((config or {}).items()))
    return f"{files_digest(list(sha256s))[:16]}-{version}-{hashlib.sha256(machine.encode()).hexdigest()[:8]}"


def source_files(path: Path) -> list[Path]:
    """The files OpenVINO builds a model at `path` from: an IR's .xml and its .bin, an ONNX file and the external
    data files its initializers reference (relative to it)."""
    path = Path(path)
    if path.suffix == ".xml":
        return [path] + ([path.with_suffix(".bin")] if path.with_suffix(".bin").is_file() else [])
    if path.suffix != ".onnx":
        return [path]
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = dict.fromkeys(  # ordered, each once
        entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data if entry.key == "location")
    return [path] + [path.parent / location for location in locations]


class OpenVinoEngine(Engine):
    """Run an ONNX or IR file on OpenVINO's CPU plugin at an explicit inference precision."""

    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        *,
        model_bytes: bytes | None = None,
        weights_bytes: bytes | None = None,
        sha256s: Sequence[str] | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        streams: int | None = None,
        hint: str = "LATENCY",
        cache_dir: str | Path | None = None,
        cpu: str | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISION_HINTS:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
        if hint not in HINTS:
            raise ValueError(f"performance hint must be one of {', '.join(HINTS)}, got {hint!r}")
        for name, value in (("threads", threads), ("streams", streams)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.path = Path(path)  # what the model is called in messages; read from here unless its bytes are given
        self.model_bytes, self.weights_bytes = model_bytes, weights_bytes  # verified bytes (engines.load)
        # of every file the model is built from (model, then weights / external data), as the manifest records
        # them (already checked): not hashed again; when None, hashed from the bytes given or the files at `path`
        self.sha256s = list(sha256s) if sha256s is not None else None
        self.precision = precision
        self.threads, self.streams, self.hint = threads, streams, hint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cpu = cpu  # a summary of the CPU (engines.cpu) for the cache key; detected when None
        self._compiled = None
        self._requests: queue.Queue | None = None
        self._names: list[str] = []

    def config(self) -> dict[str, str]:
        """The compile_model properties (engines.plans.openvino_config: the same as convert gated the plan with)."""
        return openvino_config(self.precision, self.threads, self.streams, self.hint)

    def load(self) -> OpenVinoEngine:
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineError(f"OpenVINO is not installed here (pip install openvino): {exc}") from exc
        if self.model_bytes is None and not self.path.is_file():
            raise EngineError(f"model file {self.path} does not exist")
        config = self.config()
        if self.cache_dir is not None:
            key = cache_key(self._sha256s(), ov.__version__, self._cpu(), config)
            config["CACHE_DIR"] = str(self.cache_dir / key)
        try:
            core = ov.Core()
            if self.model_bytes is None:
                self._compiled = core.compile_model(str(self.path), "CPU", config)
            else:  # the bytes whose sha256 the manifest vouches for: the path is never reopened
                weights = ov.Tensor(np.frombuffer(self.weights_bytes, np.uint8)) if self.weights_bytes else None
                model = core.read_model(self.model_bytes, weights) if weights is not None else core.read_model(self.model_bytes)
                self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's message
            raise EngineError(f"OpenVINO could not compile {self.path}: {exc}") from exc
        self._inputs = [spec_of(port) for port in self._compiled.inputs]
        self._outputs = [spec_of(port) for port in self._compiled.outputs]
        self._names = [spec.name for spec in self._outputs]
        pool = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = queue.Queue()
        for _ in range(pool):
            self._requests.put(self._compiled.create_infer_request())
        self.parallelism = pool
        log.info("loaded %s on OpenVINO %s (%s, %d infer request(s))", self.path, ov.__version__, config, pool)
        return self

    def _sha256s(self) -> list[str]:
        """The sha256 of every file the compiled model is built from, for its cache key."""
        if self.sha256s is not None:
            return self.sha256s
        if self.model_bytes is not None:
            return [hashlib.sha256(data).hexdigest() for data in (self.model_bytes, self.weights_bytes) if data]
        from engines.manifest import sha256_file

        return [sha256_file(path) for path in source_files(self.path)]

    def _cpu(self) -> str:
        if self.cpu is None:
            from engines.cpu import detect

            self.cpu = detect().summary()
        return self.cpu

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = self._requests
        if requests is None:
            raise EngineError("OpenVinoEngine is closed")
        request = requests.get()
        try:
            request.infer(inputs, share_inputs=True)  # read only, and the request is ours until it returns
            # copies: the request's output tensors are overwritten by its next run
            return {name: np.array(request.get_tensor(name).data, copy=True) for name in self._names}
        except Exception as exc:
            raise EngineError(f"OpenVINO failed on {self.path.name}: {exc}") from exc
        finally:
            requests.put(request)

    def close(self) -> None:
        self._compiled = self._requests = None
        self.parallelism = 1
        self._inputs = self._outputs = None

    def describe(self) -> dict[str, str]:
        try:
            import openvino as ov

            version = ov.__version__.split("-")[0]
        except ImportError:
            version = "missing"
        described = {"runtime": self.backend, "version": version, "device": "cpu",
                     "precision": {"f32": "fp32", "fp16": "f16"}.get(self.precision, self.precision), "hint": self.hint}
        if self._compiled is not None:
            described["streams"] = str(self._compiled.get_property("NUM_STREAMS"))
            described["threads"] = str(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        return described


def open_variant(model_dir: Path, manifest, info, files: dict, *, precision: str = "fp32",
                 intra_op_threads: int | None = None, streams: int | None = None, hint: str = "LATENCY",
                 cache_dir: str | Path | None = None) -> OpenVinoEngine:
    """engines.load(..., backend="openvino"): the variant's ONNX file (or a plan's own IR, role `openvino` +
    `openvino_weights`) at `precision`, compiled from the bytes the manifest's sha256 vouches for
    (intra_op_threads: OpenVINO's INFERENCE_NUM_THREADS, as the other CPU backends take it). A variant whose ONNX
    keeps its weights in external data is refused: OpenVINO reads those only by path."""
    model = files.get("openvino") or files.get("onnx")
    if model is None:
        raise EngineError(f"variant {info.name!r} has no ONNX file in its manifest entry")
    if "openvino" not in files and "onnx_data" in files:
        raise EngineError(
            f"variant {info.name!r} keeps its ONNX weights in an external data file ({files['onnx_data'].ref.path}); "
            "OpenVINO would read it by a path relative to the working directory, not from the verified bytes: "
            "serve this variant on ONNX Runtime")
    weights = files.get("openvino_weights")
    return OpenVinoEngine(model.path, model_bytes=model.read(), weights_bytes=weights.read() if weights else None,
                          sha256s=[source.ref.sha256 for source in (model, weights) if source is not None],
                          precision=precision, threads=intra_op_threads or None, streams=streams, hint=hint,
                          cache_dir=cache_dir)
