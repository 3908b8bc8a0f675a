"""TensorRT engine: run a serialized plan with torch CUDA tensors as device buffers.

TensorRT is imported lazily (`import_tensorrt`), never at module import, so `import engines` and the CPU test
suite work without it. The full `tensorrt` module is preferred; `tensorrt_lean` (runtime only) is the
fallback and runs version-compatible plans. The flow per batch follows tensorrt.md §1.3:

    set_input_shape (checked) -> get_tensor_shape of each output (after all inputs are set)
    -> set_tensor_address for every I/O tensor -> execute_async_v3 on a non-default stream (checked)
    -> copy outputs to host -> one stream synchronize.

The CUDA side (stream, uploads, allocations, the one synchronize) sits behind `CudaDevice`, the only place
that touches torch.cuda; unit tests replace it and the TensorRT module with recording fakes.
A batch larger than the profile's maximum is an InputError (the batcher splits batches, never this engine).

What the server opens (`open_variant`) is a plan the manifest records (`VariantInfo.tensorrt_plans`), read once and
deserialized from the bytes whose sha256 the manifest holds; its host code (a version-compatible plan's lean
runtime) runs only when that record says so. Sidecars choose nothing and allow nothing at serving time.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError, InputError, TensorSpec
from engines.trt_cache import capturing_logger

log = logging.getLogger(__name__)

# trt.DataType member name -> (OIP datatype, torch dtype name). BF16/FP8/INT4 have no numpy dtype: not served.
_DTYPES = {
    "FLOAT": ("FP32", "float32"),
    "HALF": ("FP16", "float16"),
    "INT8": ("INT8", "int8"),
    "INT32": ("INT32", "int32"),
    "INT64": ("INT64", "int64"),
    "UINT8": ("UINT8", "uint8"),
    "BOOL": ("BOOL", "bool"),
}


def import_tensorrt():
    """The `tensorrt` module, else `tensorrt_lean`; EngineError naming both when neither imports."""
    try:
        import tensorrt

        return tensorrt
    except ImportError as full_error:
        try:
            import tensorrt_lean

            return tensorrt_lean
        except ImportError:
            raise EngineError(
                f"TensorRT is not installed (import tensorrt: {full_error}; tensorrt_lean is absent too). "
                "Install it on a GPU host (docs/gpu-tensorrt.md) or use the onnxruntime backend."
            ) from None


class CudaDevice:
    """The torch.cuda side of running a plan: one device, its streams, uploads and downloads."""

    def __init__(self, index: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineError(
                f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none "
                f"(torch.version.cuda={torch.version.cuda})"
            )
        self.torch = torch
        self.device = torch.device("cuda", index)

    def name(self) -> str:
        return self.torch.cuda.get_device_name(self.device)

    def compute_capability(self) -> str:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return f"{major}.{minor}"

    def active(self):
        """Make this GPU current (TensorRT deserializes onto the current device)."""
        return self.torch.cuda.device(self.device)

    def new_stream(self):
        return self.torch.cuda.Stream(device=self.device)  # never the default stream

    def on(self, stream):
        return self.torch.cuda.stream(stream)

    def upload(self, array: np.ndarray, dtype: str):
        host = self.torch.from_numpy(np.ascontiguousarray(array))
        return host.to(self.device, getattr(self.torch, dtype), non_blocking=True).contiguous()

    def empty(self, shape: tuple[int, ...], dtype: str):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def download(self, buffer):
        return buffer.to("cpu", non_blocking=True)

    def synchronize(self, stream) -> None:
        stream.synchronize()


class TensorRTEngine(Engine):
    """Run a TensorRT plan (``*.plan`` with its sidecar ``*.json`` from engines.trt_cache) on one GPU."""

    backend = "tensorrt"

    def __init__(self, plan_path, *, device: int = 0, gate: tuple[object, object] | None = None,
                 key=None, host_code_allowed: bool = False) -> None:
        """`plan_path`: a path, or an engines.manifest.Artifact (its verified bytes are deserialized); `key`: the
        EngineKey the manifest records (else the sidecar's, for describe() only); `host_code_allowed`: the
        manifest's word that the plan's embedded runtime may run (never a sidecar's)."""
        super().__init__()
        self.artifact = None if isinstance(plan_path, str | Path) else plan_path
        self.plan_path = Path(plan_path) if self.artifact is None else self.artifact.path
        self.key, self.host_code_allowed = key, host_code_allowed
        self.gate = gate  # a lossy variant's (reference.npz, manifest Accuracy): judged at load, before serving
        self.device_index = device
        self._trt = None
        self._runtime = None
        self._cuda = None
        self._logger = None
        self._engine = None
        self._context = None
        self._stream = None
        self._io: dict[str, str] = {}  # tensor name -> torch dtype name
        self._profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # input -> (min, max)
        self._precision = "unknown"
        self._lock = threading.Lock()  # one execution context: never run it from two threads at once

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> TensorRTEngine:
        trt = import_tensorrt()
        if self.artifact is None and not self.plan_path.is_file():
            raise EngineError(f"TensorRT plan {self.plan_path} does not exist")
        cuda = CudaDevice(self.device_index)
        key = self.key or self._read_key()
        self._precision = key.precision if key else "unknown"
        logger = capturing_logger(trt)
        with cuda.active():
            runtime, engine, context = self._deserialize(trt, cuda, logger, key)
            stream = cuda.new_stream()
        inputs, outputs = self._read_io(trt, engine)
        # keep the runtime (and its logger) alive as long as the engine
        self._trt, self._cuda, self._logger, self._runtime = trt, cuda, logger, runtime
        self._engine, self._context, self._stream = engine, context, stream
        self._inputs, self._outputs = inputs, outputs
        self.max_batch_size = min(hi[0] for _, hi in self._profiles.values()) if self._profiles else None
        log.info("loaded TensorRT plan %s: inputs %s, max batch %s", self.plan_path.name, inputs, self.max_batch_size)
        if self.gate is not None:
            self._check_gate(*self.gate)
        return self

    def _check_gate(self, reference: Path | None, accuracy) -> None:
        """An int8 plan is served only if, on the held-out inputs saved at conversion, it meets the variant's own
        accuracy gate against unfused (the same measure and thresholds the ONNX passed)."""
        from engines.manifest import accuracy_figures, load_reference

        if reference is None:
            self.close()
            raise EngineError(f"{self.plan_path.name}: a lossy variant needs its reference file to be gated; reconvert it")
        inputs, expected = load_reference(io.BytesIO(reference.read()) if hasattr(reference, "read") else reference)
        rows = len(next(iter(inputs.values())))
        step = self.max_batch_size or rows
        parts = [self.infer({k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, rows, step)]
        figures = accuracy_figures(expected, [np.concatenate([p[s.name] for p in parts]) for s in self.outputs])
        failed = accuracy.judge(figures)
        log.info("TensorRT int8 plan %s vs unfused on %d held-out inputs: %s", self.plan_path.name, rows, figures)
        if failed:
            self.close()
            raise EngineError(f"TensorRT plan {self.plan_path.name} failed its accuracy gate against unfused on "
                              f"{rows} held-out inputs ({'; '.join(failed)}); it is not served")

    def _deserialize(self, trt, cuda, logger, key):
        """Runtime -> engine -> execution context, each checked for None with TensorRT's log."""
        runtime = trt.Runtime(logger)
        if runtime is None:
            raise EngineError(f"trt.Runtime() failed:\n{logger.tail()}")
        if self.host_code_allowed:  # a version-compatible plan embeds the lean runtime as host code
            runtime.engine_host_code_allowed = True
        plan = self.artifact.read() if self.artifact is not None else self.plan_path.read_bytes()
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(
                f"deserialize_cuda_engine returned None for {self.plan_path} (TensorRT {trt.__version__}, "
                f"GPU {cuda.name()}): the plan was probably built by another TensorRT version or for another "
                f"GPU; rebuild it with `normfuse convert ... --backend tensorrt`. TensorRT said:\n{logger.tail()}"
            )
        context = engine.create_execution_context()
        if context is None:
            raise EngineError(f"create_execution_context returned None for {self.plan_path}:\n{logger.tail()}")
        return runtime, engine, context

    def _read_key(self):
        from engines.trt_cache import EngineCacheError, read_sidecar

        try:
            return read_sidecar(self.plan_path)[1]
        except EngineCacheError as exc:
            log.warning("%s; precision and build flags unknown", exc)
            return None

    def _read_io(self, trt, engine) -> tuple[list[TensorSpec], list[TensorSpec]]:
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            if dtype.name not in _DTYPES:
                raise EngineError(f"tensor {name!r} has TensorRT type {dtype.name}, which cannot be served as numpy")
            datatype, torch_dtype = _DTYPES[dtype.name]
            self._io[name] = torch_dtype
            spec = TensorSpec(name, datatype, tuple(int(d) for d in engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if -1 in spec.shape:  # profile shapes exist for inputs only (outputs give invalid Dims)
                    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                    self._profiles[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
            else:
                outputs.append(spec)
        return inputs, outputs

    def close(self) -> None:
        self._context = self._engine = self._stream = self._runtime = None
        self._inputs = self._outputs = None

    def describe(self) -> dict[str, str]:
        info = {"runtime": self.backend, "precision": self._precision, "plan": self.plan_path.name}
        if self._trt is not None:
            info["version"] = self._trt.__version__
        if self._cuda is not None:
            info["device"] = self._cuda.name()
        return info

    # -- running ---------------------------------------------------------------------------------
    def _check_profile(self, inputs: dict[str, np.ndarray]) -> None:
        for name, (lo, hi) in self._profiles.items():
            shape = inputs[name].shape
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                raise InputError(
                    f"input {name!r}: shape {tuple(shape)} is outside the engine's optimization profile "
                    f"min {lo} max {hi}; larger batches must be split by the caller"
                )

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise EngineError("TensorRTEngine is not loaded or was closed")
        self._check_profile(inputs)
        with self._lock:
            return self._execute(inputs)

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx, cuda, stream = self._context, self._cuda, self._stream
        with cuda.on(stream):
            buffers = {}
            for spec in self._inputs:
                buffer = cuda.upload(inputs[spec.name], self._io[spec.name])
                shape = tuple(buffer.shape)
                if not ctx.set_input_shape(spec.name, shape):
                    raise EngineError(f"set_input_shape({spec.name!r}, {shape}) failed:\n{self._logger.tail()}")
                buffers[spec.name] = buffer
            for spec in self._outputs:  # only now are output shapes known
                shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"output {spec.name!r} shape {shape} is unresolved after setting input shapes")
                buffers[spec.name] = cuda.empty(shape, self._io[spec.name])
            for name, buffer in buffers.items():
                if not ctx.set_tensor_address(name, buffer.data_ptr()):
                    raise EngineError(f"set_tensor_address({name!r}) failed:\n{self._logger.tail()}")
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"execute_async_v3 failed for {self.plan_path.name}:\n{self._logger.tail()}")
            host = {spec.name: cuda.download(buffers[spec.name]) for spec in self._outputs}
        cuda.synchronize(stream)  # the one sync per batch: outputs are on the host after this
        return {spec.name: host[spec.name].numpy().astype(spec.dtype, copy=False) for spec in self._outputs}


def find_plan(model_dir: str | Path, variant, *, precision: str | None = None, device: int = 0) -> Path:
    """The plan in ``model_dir/<variant>/tensorrt/`` built from this variant's ONNX (manifest sha256), at
    `precision` (None: any, the most recently built wins), for the installed TensorRT and this GPU;
    EngineCacheError (listing every plan there and why it was refused) when there is none.
    `variant` is the manifest's VariantInfo."""
    from engines.trt_cache import select_plan, variant_source_sha256

    trt, cuda = import_tensorrt(), CudaDevice(device)
    return select_plan(
        Path(model_dir) / variant.name / "tensorrt",
        variant.name,
        source_sha256=variant_source_sha256(variant.files),
        precision=precision,
        trt_version=str(trt.__version__),
        gpu_name=cuda.name(),
        compute_capability=cuda.compute_capability(),
    )


def recorded_plan(model_dir: str | Path, variant, *, precision: str | None = None, device: int = 0):
    """(Artifact, PlanRef) of the plan the manifest records for this variant's ONNX, at `precision` (None: any,
    the last recorded wins), for the installed TensorRT and this GPU; EngineCacheError listing each record and
    why it was refused (or that there are none: a manifest from before plans were recorded)."""
    from engines.manifest import artifact
    from engines.trt_cache import select_recorded, variant_source_sha256

    trt, cuda = import_tensorrt(), CudaDevice(device)
    record = select_recorded(variant.tensorrt_plans, variant.name, source_sha256=variant_source_sha256(variant.files),
                             precision=precision, trt_version=str(trt.__version__), gpu_name=cuda.name(),
                             compute_capability=cuda.compute_capability())
    return artifact(Path(model_dir), variant.name, "tensorrt plan", record), record


def open_variant(model_dir: Path, manifest, info, files: dict, *, precision: str | None = None,
                 device: int = 0, intra_op_threads: int = 0) -> TensorRTEngine:
    """The `engines.load(..., backend="tensorrt")` opener: the plan the manifest records for this variant, GPU
    and TensorRT (`recorded_plan`), as a TensorRTEngine that is not loaded yet. `files`: role -> Artifact.
    `intra_op_threads` is accepted for the service's common options and ignored (no CPU threads to size)."""
    from engines.trt_cache import EngineKey

    gate = None
    if info.accuracy is not None:  # a lossy variant: one plan precision (its QDQ ONNX's explicit int8), gated
        precision, gate = "int8", (files.get("reference"), info.accuracy)
    plan, record = recorded_plan(model_dir, info, precision=precision, device=device)
    return TensorRTEngine(plan, device=device, gate=gate, key=EngineKey.from_json(record.key),
                          host_code_allowed=record.host_code_allowed)
