"""ONNX (and torch.export) artifacts of one variant, and the op census ONNX Runtime leaves after optimizing them.

Exporter and opset, chosen deliberately (notes: tensorrt.md §5, norm-fusion.md §1.3 and §8):

* **The TorchScript exporter (`dynamo=False`) at opset 17.** It emits one `LayerNormalization` per
  `nn.LayerNorm` *with* explicit γ and β inputs (constants when the affine is absent or folded), which is what
  ONNX Runtime's Skip/Bias fusions need, and what TensorRT ≥ 8.6 maps to its INormalizationLayer. Our
  hand-written `convert.modules.RMSNorm` (`x / sqrt(mean(x²) + eps) * weight`, explicit weight of ones) exports
  as primitives that ORT fuses into `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`.
* Not the dynamo exporter: its default opset 20 and opset 18 drop the LayerNormalization bias input when β is
  absent (ORT's transformer optimizer crashes on it), down-conversion to 17 fails or silently yields 18, and
  opset 23 emits `RMSNormalization`, which ORT runs without any Skip fusion and TensorRT < 10.15 cannot parse.
  The TorchScript exporter cannot export `nn.RMSNorm`/`F.rms_norm`; sources using them are refused by the
  pipeline with the exporter's message.
* Fused MoE experts (transformers' `grouped_mm`, not exportable) are exported through transformers' own
  `batched_mm` form, and the exporter's C-level prints go to the conversion log (`convert.exportable`).
* Weights stay inside `model.onnx` (one file; protobuf caps it at 2 GB, larger models are refused).
* Written in pieces (`_export_streaming`): the exporter writes the graph without weights and each weight is
  appended from its torch tensor, instead of the exporter's three in-memory copies of the weights
  (GPT-2-small: +0.5 GB during export instead of +1.5 GB); the file is the same one-file model.
* No exporter constant folding: ONNX Runtime (level 1) and TensorRT fold constants themselves, while the
  exporter's folding stored a transposed copy of GPT-2's tied embedding (file 621 MB instead of 474 MB) and
  raised peak memory during export by ~0.45 GB (measured on GPT-2-small: 2.80 -> 2.37 GB).

Each variant also gets `model.pt` (the pickled eval-mode module, see `export_torch`) for the TorchEngine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from convert.exportable import captured_output, exportable, last_error
from engines.manifest import TensorInfo

log = logging.getLogger(__name__)

OPSET = 17
ONNX_LIMIT = 2 * 1024**3
# fused normalization ops ORT (or the exporter) produce; their loss in a variant is flagged
FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
               "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
# what the census reports: fused norms, BatchNorm, and the primitives a decomposed norm leaves behind
CENSUS_OPS = FUSED_NORMS + ("BatchNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Reciprocal", "Div")
# primitives of a normalization ORT did not fuse
NORM_PRIMITIVES = ("ReduceMean", "ReduceSum", "Pow", "Sqrt", "Reciprocal")


class ExportError(RuntimeError):
    """The model could not be exported to a valid ONNX file."""


class _Positional(torch.nn.Module):
    """Call a keyword-argument model positionally and return only tensors (what both exporters need)."""

    def __init__(self, model: torch.nn.Module, names: list[str], n_outputs: int) -> None:
        super().__init__()
        self.model, self.names, self.n_outputs = model, names, n_outputs

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        values = list(out.values()) if isinstance(out, dict) else list(out)
        return values[0] if self.n_outputs == 1 else tuple(values[: self.n_outputs])


def dynamic_axes(infos: list[TensorInfo]) -> dict[str, dict[int, str]]:
    """-1 dims -> named ONNX dims: axis 0 'batch', axis 1 'sequence' (text models), others 'dim<k>'."""
    names = {0: "batch", 1: "sequence"}
    return {t.name: {a: names.get(a, f"dim{a}") for a, d in enumerate(t.shape) if d == -1} for t in infos}


def as_tensors(arrays: dict[str, np.ndarray], inputs: list[TensorInfo]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[t.name])) for t in inputs)


def export_onnx(model: torch.nn.Module, example: dict[str, np.ndarray], path: Path, *,
                inputs: list[TensorInfo], outputs: list[TensorInfo], check: bool = True) -> Path:
    """Export `model` (eval) to `path` with dynamic axes, check it with onnx.checker, return the path.

    `check=False` leaves the check to the caller (`check_onnx`), e.g. for after the torch model is freed.
    """
    # the wrapper must be in eval mode too: the exporter restores the wrapper's mode onto the model afterwards
    wrapped = _Positional(model.eval(), [t.name for t in inputs], len(outputs)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in inputs]
    settings = dict(dynamo=False, opset_version=OPSET, input_names=names, output_names=[t.name for t in outputs],
                    dynamic_axes=dynamic_axes(inputs) | dynamic_axes(outputs),
                    do_constant_folding=False)  # ORT and TensorRT fold constants themselves; see the module doc
    try:  # fused MoE experts switched to an exportable form; the exporter's prints go to the log, not the terminal
        with warnings.catch_warnings(), torch.no_grad(), _no_onnxscript_pass(), exportable(model, OPSET), \
                captured_output("torch.onnx.export"):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer warnings
            if not _export_streaming(wrapped, as_tensors(example, inputs), path, settings):
                torch.onnx.export(wrapped, as_tensors(example, inputs), str(path), **settings)
    except Exception as exc:
        log.debug("torch.onnx.export failed", exc_info=True)  # the whole message (it may hold the graph): the log
        raise ExportError(f"torch.onnx.export (TorchScript exporter, opset {OPSET}) failed: {last_error(exc)} "
                          "(the exporter's full output is in the conversion log)") from exc
    if path.stat().st_size >= ONNX_LIMIT:
        raise ExportError(f"{path} is {path.stat().st_size} bytes; models over 2 GB are not supported yet")
    return check_onnx(path) if check else path


# torch dtype -> ONNX TensorProto data type, for the initializers written by _export_streaming
_ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
               torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


def _export_streaming(model: torch.nn.Module, args: tuple, path: Path, settings: dict) -> bool:
    """Export the graph without weights, then append the weights one tensor at a time; False: not possible.

    `torch.onnx.export` builds the whole ModelProto in C++, serializes it and copies the bytes into Python:
    three copies of the weights at once (GPT-2-small: +1.5 GB over the model). Here the exporter writes the
    graph with the parameters as graph inputs (`export_params=False`, a few hundred KB); those inputs are
    dropped and each parameter is appended as a graph initializer straight from the torch tensor. Protobuf
    merges repeated occurrences of a message field, so `graph { initializer {...} }` records appended to a
    serialized ModelProto add initializers to its graph: the file is the ordinary one-file model.
    Falls back (returns False) when a graph input is neither a model input nor a tensor of `model`.
    """
    import io

    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(model, args, buffer, export_params=False, **settings)
    proto = onnx.load_from_string(buffer.getvalue())
    state = dict(model.state_dict(keep_vars=True))
    user = set(settings["input_names"])
    weights = []
    for info in proto.graph.input:
        if info.name in user:
            continue
        tensor = state.get(info.name)
        shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if tensor is None or _ONNX_TYPES.get(tensor.dtype) != info.type.tensor_type.elem_type \
                or list(tensor.shape) != shape:
            log.info("export: graph input %s is not a tensor of the model; exporting in one piece", info.name)
            return False
        weights.append((info.name, tensor.detach()))
    kept = [info for info in proto.graph.input if info.name in user]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())
        for name, tensor in weights:
            tensor = tensor.cpu().contiguous()
            header = onnx.TensorProto(name=name, dims=list(tensor.shape), data_type=_ONNX_TYPES[tensor.dtype])
            header = header.SerializeToString()
            raw = tensor.reshape(-1).view(torch.uint8).numpy()  # no copy; ONNX raw_data is little-endian
            data = _field(9, raw.nbytes)  # TensorProto.raw_data
            initializer = _field(5, len(header) + len(data) + raw.nbytes)  # GraphProto.initializer
            file.write(_field(7, len(initializer) + len(header) + len(data) + raw.nbytes))  # ModelProto.graph
            file.write(initializer + header + data)
            file.write(memoryview(raw))
    return True


def _field(number: int, length: int) -> bytes:
    """A length-delimited protobuf field's key and length."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def check_onnx(path: Path) -> Path:
    """onnx.checker (full check, with shape inference) of an exported file; ExportError when it is rejected.

    The checker holds the whole model in memory twice (GPT-2-small's rmsnorm: +1.3 GB), but reads no
    initializer's values (only their types and shapes). So it checks a copy of the file's structure in which
    every large initializer's `raw_data` is an external-data reference to its bytes in `path` itself
    (`_without_weights`: the file is read as a stream, a few MB at a time); ONNX Runtime then loads the
    real file for the parity check.
    """
    import onnx

    handle, name = tempfile.mkstemp(dir=path.parent, prefix=".check-", suffix=".onnx")  # beside `path`
    os.close(handle)
    skeleton = Path(name)
    try:
        skeleton.write_bytes(_without_weights(path, path.name))
        onnx.checker.check_model(str(skeleton), full_check=True)
    except Exception as exc:
        log.debug("onnx.checker rejected %s", path, exc_info=True)
        raise ExportError(f"onnx.checker rejected {path}: {last_error(exc)}") from exc
    finally:
        skeleton.unlink(missing_ok=True)
    return path


EXTERNAL_MIN_BYTES = 1024  # initializers with more raw data than this become external references when checked


def _without_weights(path: Path, location: str) -> bytes:
    """The ModelProto in `path` with each large initializer's raw_data replaced by a reference into the file."""
    out = bytearray()
    with open(path, "rb") as file:
        size = path.stat().st_size
        while file.tell() < size:
            number, header, length = _read_field(file)
            if number != 7:  # ModelProto.graph: every other field is copied as it is
                out += header + file.read(length)
                continue
            graph, end = bytearray(), file.tell() + length
            while file.tell() < end:
                sub, header, sub_length = _read_field(file)
                if sub != 5 or sub_length <= EXTERNAL_MIN_BYTES:  # GraphProto.initializer (small ones copied)
                    graph += header + file.read(sub_length)
                    continue
                tensor = _external_tensor(file, file.tell() + sub_length, location)
                graph += _field(5, len(tensor)) + tensor
            out += _field(7, len(graph)) + graph
    return bytes(out)


def _external_tensor(file, end: int, location: str) -> bytes:
    """A TensorProto read from `file` up to `end`, its raw_data (field 9) replaced by an external reference."""
    import onnx

    fields = bytearray()
    offset = length = None
    while file.tell() < end:
        number, header, size = _read_field(file)
        if number == 9:
            offset, length = file.tell(), size
            file.seek(size, 1)
        else:
            fields += header + file.read(size)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(bytes(fields))
    if offset is not None:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
    return tensor.SerializeToString()


def _read_field(file) -> tuple[int, bytes, int]:
    """(field number, its bytes up to the payload, payload length): a length-delimited field's key and
    length, or a scalar field whole (payload length 0)."""
    key, raw = _read_varint(file)
    wire = key & 7
    if wire == 2:
        length, raw_length = _read_varint(file)
        return key >> 3, raw + raw_length, length
    if wire == 0:
        return key >> 3, raw + _read_varint(file)[1], 0
    if wire in (1, 5):
        return key >> 3, raw + file.read(8 if wire == 1 else 4), 0
    raise ValueError(f"unsupported protobuf wire type {wire} (field {key >> 3})")


def _read_varint(file) -> tuple[int, bytes]:
    value = shift = 0
    raw = bytearray()
    while True:
        byte = file.read(1)
        if not byte:
            raise ValueError("truncated protobuf")
        raw += byte
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return value, bytes(raw)


@contextlib.contextmanager
def _no_onnxscript_pass():
    """Skip the TorchScript exporter's onnxscript-function pass when it cannot add anything.

    After serializing, the exporter parses the whole model back into a Python ModelProto to look for nodes
    in custom domains with a registered onnxscript function, and re-serializes only when it finds one
    (GPT-2-small: +0.5 GB during export for nothing). Only symbolic functions registered for a custom
    domain can match (torch's own `quantized` symbolics are plain functions, not onnxscript); with none
    registered the model bytes are returned as they are.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils, registration
    except ImportError:  # another torch layout: leave the exporter alone
        yield
        return
    original = onnx_proto_utils._add_onnxscript_fn

    def add_functions(model_bytes: bytes, custom_opsets) -> bytes:
        domains = {key.partition("::")[0] for key in registration.registry._registry}
        if custom_opsets or domains - {"", "aten", "prim", "onnx", "quantized"}:
            return original(model_bytes, custom_opsets)
        return model_bytes

    onnx_proto_utils._add_onnxscript_fn = add_functions
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = original


def export_torch(model: torch.nn.Module, path: Path) -> Path:
    """Save the eval-mode module itself (`torch.save`, model.pt) for engines.torch.

    A pickled module rather than a `torch.export` program: it saves in a second where torch.export of
    GPT-2-small takes ~15 s, keeps the keyword-argument calling convention, and moves to CUDA or through
    `torch.compile` like any module. engines.torch loads it with `torch.load(weights_only=True)`, allowing
    only the module's own classes (engines.torch.module_classes), from the bytes the manifest's sha256 vouches for.
    """
    try:
        torch.save(model.eval(), str(path))
    except Exception as exc:  # e.g. a module holding a lambda
        path.unlink(missing_ok=True)
        raise ExportError(f"torch.save of the module failed: {exc}") from exc
    return path


def ort_session(onnx_path: Path, *, threads: int | None = None, optimization: str = "ORT_ENABLE_ALL",
                optimized_path: Path | None = None):
    """A CPU ONNX Runtime session (convert talks to onnxruntime directly; it shares only the manifest with engines)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # conversion runs each session briefly: hold no arena between runs
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:  # the dump is read only for its op types: keep its weights in a side file
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized_path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict[str, np.ndarray], *, chunk: int = 8) -> list[np.ndarray]:
    """All outputs of `session` on `inputs`, run `chunk` samples at a time (bounded memory)."""
    n = len(next(iter(inputs.values())))
    parts = [session.run(None, {k: v[i:i + chunk] for k, v in inputs.items()}) for i in range(0, n, chunk)]
    return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]


def census(onnx_path: Path, *, threads: int | None = None,
           inputs: dict[str, np.ndarray] | None = None) -> tuple[dict[str, int], list[np.ndarray] | None]:
    """Op census after ORT_ENABLE_ALL optimization (CENSUS_OPS and the total node count).

    With `inputs`, the same session also runs them, so parity and census cost one session: returns
    (census, outputs), outputs None without inputs.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = ort_session(onnx_path, threads=threads, optimized_path=optimized)
        outputs = run_onnx(session, inputs) if inputs is not None else None
        del session
        gc.collect()
        graph = onnx.load(str(optimized), load_external_data=False).graph
        counts = Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in CENSUS_OPS if counts[op]} | {"total": sum(counts.values())}, outputs


def lost_fusions(reference: dict[str, int], candidate: dict[str, int]) -> list[str]:
    """Flags for fusions the reference (unfused) graph had and the candidate lost.

    A variant that removes norms on purpose (fewer fused norms, but no extra norm primitives) is not flagged.
    """
    def total(census_: dict[str, int], ops: tuple[str, ...]) -> int:
        return sum(census_.get(op, 0) for op in ops)

    flags = []
    fused_ref, fused = total(reference, FUSED_NORMS), total(candidate, FUSED_NORMS)
    extra = total(candidate, NORM_PRIMITIVES) - total(reference, NORM_PRIMITIVES)
    if fused < fused_ref and extra > 0:
        flags.append(f"lost-fusion:normalization ({fused} fused norm ops vs {fused_ref} in unfused; "
                     f"{extra} more {'/'.join(NORM_PRIMITIVES)} ops)")
    skip_ref, skip = total(reference, SKIP_NORMS), total(candidate, SKIP_NORMS)
    if fused and skip < skip_ref:
        flags.append(f"lost-fusion:SkipLayerNormalization ({skip} Skip* ops vs {skip_ref} in unfused)")
    return flags
