"""PyTorch engine: the reference runner, and a way to time fused vs unfused on any NVIDIA GPU without TensorRT.

It runs an `nn.Module` given in memory (called with keyword arguments named after the input specs), or a
saved variant artifact:

* `model.pt` (what `normfuse convert` writes): the pickled eval-mode module (`torch.save(module)`), loaded
  with `torch.load(weights_only=True)`, never a general unpickler: only the classes a module is made of may be
  named in it (`module_classes`: nn.Module subclasses, dataclasses, enums, transformers' and convert's
  classes, torch.nn.functional's functions, numpy's array rebuilders, the `kernels` hub's layer rebuilder for
  transformers' own layers only), and nothing else is ever called or built; anything else is refused, naming it. It needs the model's classes
  importable (normfuse, transformers).
* `*.pt2`: a `torch.export` program (`torch.export.save`), called positionally in input-spec order.

Given an engines.manifest.Artifact (what engines.load passes), the bytes loaded are the bytes whose sha256 the
manifest holds (read once).

Options: `device` "cpu" | "cuda"; `mode` "eager" | "compile" (`torch.compile`, dynamic shapes);
`cuda_graphs=True` compiles with mode="reduce-overhead" (CUDA graphs, needs device="cuda");
`precision` "fp32" | "fp16" | "bf16" runs weights and floating inputs in that dtype and returns outputs in
the output spec's dtype; `intra_op_threads` (0 / None = torch's default) calls `torch.set_num_threads` on load,
which is process-wide.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import io
import logging
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError, TensorSpec

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "fp16", "bf16")


def first_tensor(output, names: list[str]) -> list:
    """Model output (tensor, tuple/list, dict or HF ModelOutput) -> one tensor per output name."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # includes HF ModelOutput (an OrderedDict)
        if all(name in output for name in names):
            return [output[name] for name in names]
        return list(output.values())[: len(names)]
    if isinstance(output, (tuple, list)):
        return list(output)[: len(names)]
    raise EngineError(f"model returned {type(output).__name__}; expected a tensor, tuple or dict of tensors")


_MODULE_PACKAGES = ("transformers.", "convert.")  # classes of these may be named in model.pt (configs, ...)
_TENSOR_FUNCTIONS = ("torch.nn.functional.", "torch._C._nn.")  # activations held as attributes (no I/O there)
# numpy arrays held by a module or its config: numpy's own array and scalar rebuilders (torch's documented set)
_NUMPY = {f"numpy.{core}.multiarray.{name}" for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
_NUMPY |= {"numpy.ndarray", "numpy.dtype"}


def _kernel_func_of_a_model(built: list):
    """The `kernels` hub's pickle rebuilder for a model layer's forward (transformers' Llama-family norms and
    MLPs pickle through it), let through only for functions of transformers' or convert's own modules (it
    imports the module it is given and instantiates a type found there). The layer class it builds is local,
    so it is allowed for the rest of this load (appended to `built`, the load's own allowlist)."""

    def rebuild(module_name: str, func_name: str):
        import torch

        if not module_name.startswith(_MODULE_PACKAGES):
            raise EngineError(f"model.pt asks to rebuild {module_name}.{func_name}, not a model's layer: refused")
        from kernels._internals.layer.layer import _rebuild_kernel_func

        layer = _rebuild_kernel_func(module_name, func_name)
        if not isinstance(layer, torch.nn.Module):
            raise EngineError(f"model.pt rebuilt {module_name}.{func_name} as {type(layer).__name__}: refused")
        built.append(type(layer))
        torch.serialization.add_safe_globals([type(layer)])  # removed with `built` when the load ends
        return layer

    return rebuild


# globals a model.pt may name that are let through as a guarded substitute (name -> its factory)
_GUARDED = {"kernels._internals.layer.layer._rebuild_kernel_func": _kernel_func_of_a_model}


def module_classes(names: list[str]) -> list:
    """The globals a pickled module names, resolved, if each is a class a module is made of (or a tensor function
    such as an activation held as an attribute); EngineError naming the first that is not (any other function,
    a builtin, a class from elsewhere: unpickling it could run code)."""
    import torch

    allowed: list = []
    for name in names:
        if name in _GUARDED:
            allowed.append((_GUARDED[name](allowed), name))
            continue
        module_name, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise EngineError(f"model.pt names {name!r}, which cannot be imported here ({exc})") from None
        if (name.startswith(_TENSOR_FUNCTIONS) and callable(found)) or name in _NUMPY or (
                name.startswith("numpy.dtypes.") and isinstance(found, type)):
            allowed.append(found)
            continue
        if not isinstance(found, type) or not (
                issubclass(found, torch.nn.Module) or dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)
                or name.startswith(_MODULE_PACKAGES)):
            raise EngineError(f"model.pt names {name!r}, which is not a module, config or enum class: refused "
                              "(unpickling it could run code); re-convert, or export a .pt2")
        allowed.append(found)
    if "numpy.dtype" in names:  # a dtype is rebuilt as its DType class (numpy.dtypes.Float32DType, ...)
        import numpy.dtypes

        allowed += [getattr(numpy.dtypes, name) for name in numpy.dtypes.__all__]
    return allowed


def load_module(data: bytes, path: Path, device: str):
    """`torch.load(weights_only=True)` of a pickled module, with only its own classes allowed (module_classes)."""
    import torch

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as exc:
        raise EngineError(f"could not read the torch module {path}: {exc}") from exc
    with torch.serialization.safe_globals(module_classes(needed)):
        try:
            return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        except Exception as exc:
            raise EngineError(f"could not load the torch module {path}: {exc}") from exc


class TorchEngine(Engine):
    """Run a torch model (in memory, or a `model.pt2` torch.export artifact) against given specs."""

    backend = "torch"

    def __init__(
        self,
        model,
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: str = "cpu",
        mode: str = "eager",
        cuda_graphs: bool = False,
        precision: str = "fp32",
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
        if cuda_graphs and (device != "cuda" or mode != "compile"):
            raise ValueError("cuda_graphs=True needs device='cuda' and mode='compile'")
        self.source = model  # an nn.Module, an engines.manifest.Artifact, or the path of a model.pt / .pt2 file
        self.path = Path(getattr(model, "path", model)) if not hasattr(model, "forward") else None  # the file
        self.input_specs, self.output_specs = list(inputs), list(outputs)
        self.device, self.mode, self.cuda_graphs, self.precision = device, mode, cuda_graphs, precision
        if intra_op_threads is not None and intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        self.intra_op_threads = intra_op_threads or None  # 0 / None: torch's default
        self._module = None
        self._dtype = None
        self._positional = False

    def load(self) -> TorchEngine:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("TorchEngine: device='cuda' was asked for but CUDA is not available in this torch build")
        if self.intra_op_threads:
            # torch's intra-op pool is process-wide: the last engine loaded sets it for all torch engines
            torch.set_num_threads(self.intra_op_threads)
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        module = self._open()
        module = module.to(self._dtype) if self.precision != "fp32" else module
        if self.mode == "compile":
            # many models of one class exceed dynamo's default recompile limit (8) and fall back to eager silently
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compile_mode = "reduce-overhead" if self.cuda_graphs else None
            module = torch.compile(module, dynamic=True, mode=compile_mode)
        self._module = module
        self._inputs, self._outputs = list(self.input_specs), list(self.output_specs)
        return self

    def _open(self):
        import torch

        if isinstance(self.source, torch.nn.Module):
            # never move or cast the caller's module: copy it when the device or dtype changes
            changes = self.device != "cpu" or self.precision != "fp32"
            return (copy.deepcopy(self.source) if changes else self.source).eval().to(self.device)
        path = self.path
        if not hasattr(self.source, "read") and not path.is_file():
            raise EngineError(f"torch artifact {path} does not exist")
        data = self.source.read() if hasattr(self.source, "read") else path.read_bytes()
        if path.suffix != ".pt2":
            return load_module(data, path, self.device).eval()
        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise EngineError(f"could not load torch.export artifact {path}: {exc}") from exc
        if self.device != "cpu":
            program = torch.export.passes.move_to_device_pass(program, self.device)
        self._positional = True
        return program.module()

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self._module is None:
            raise EngineError("TorchEngine is closed")
        tensors = {}
        for name, array in inputs.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
            tensors[name] = tensor.to(self._dtype) if tensor.is_floating_point() else tensor
        names = [spec.name for spec in self.output_specs]
        try:
            with torch.inference_mode():
                if self._positional:  # a .pt2 program takes the inputs positionally, in spec order
                    output = self._module(*(tensors[spec.name] for spec in self.input_specs))
                else:
                    output = self._module(**tensors)
                results = first_tensor(output, names)
        except Exception as exc:
            raise EngineError(f"torch model failed: {exc}") from exc
        return {
            spec.name: tensor.detach().to("cpu").numpy().astype(spec.dtype, copy=False)
            if tensor.dtype != torch.bfloat16
            else tensor.detach().float().to("cpu").numpy().astype(spec.dtype, copy=False)
            for spec, tensor in zip(self.output_specs, results, strict=True)
        }

    def close(self) -> None:
        self._module = None
        self._inputs = self._outputs = None

    def describe(self) -> dict[str, str]:
        import torch

        return {
            "runtime": self.backend,
            "version": torch.__version__,
            "device": self.device,
            "mode": self.mode + ("+cudagraphs" if self.cuda_graphs else ""),
            "precision": self.precision,
        }
