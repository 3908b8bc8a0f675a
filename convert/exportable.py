"""What makes a model exportable by the TorchScript ONNX exporter, and keeps the exporter off the terminal.

* **Fused mixture-of-experts** (transformers 5's Mixtral, Qwen2-MoE, OLMoE …): their default experts
  implementation (`grouped_mm`) sorts tokens by expert and counts them with `aten::histc`, which the
  TorchScript exporter cannot export at opset 17 (and `grouped_mm` has no ONNX form). While exporting,
  `exportable` switches them to transformers' own `batched_mm` implementation: every token's top-k expert
  weights are gathered (`W[expert_ids]`, ONNX Gather) and applied with one batched matmul. It computes the
  same function with no data-dependent control flow, so the traced graph holds for every routing (the
  `eager` implementation loops over the experts hit by the example, which a trace would freeze). The ONNX
  parity check against the original model then proves it like any export. The implementation is restored
  afterwards; the path taken is recorded in the manifest (`VariantInfo.exporter`).
* **Exporter output**: the TorchScript exporter prints from C++ (e.g. the whole TorchScript graph when an
  operator is not supported: ~900 lines for a tiny Mixtral). `captured_output` sends file descriptors 1 and 2
  to a temporary file while it runs and logs what was written (DEBUG: the conversion log, never the terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

import torch

log = logging.getLogger(__name__)

TORCHSCRIPT = "torchscript exporter, opset {opset}"
EXPORT_EXPERTS = "batched_mm"  # transformers' gather + batched-matmul experts: traceable, exportable


def fused_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Hugging Face models inside `model` whose experts follow `config._experts_implementation`, where it is
    not already one the exporter can trace (`batched_mm`)."""
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if not hasattr(module, "set_experts_implementation") or not hasattr(config, "_experts_implementation"):
            continue
        has_experts = any(hasattr(m, "_is_expert_parallel") for m in module.modules())  # transformers' decorator
        if has_experts and config._experts_implementation != EXPORT_EXPERTS:
            found.append(module)
    return [m for m in found if not any(m is not o and _contains(o, m) for o in found)]  # outermost only


@contextlib.contextmanager
def exportable(model: torch.nn.Module, opset: int):
    """Switch fused experts to `batched_mm` for the export; yields how the model is exported (for the manifest)."""
    switched = [(module, module.config._experts_implementation) for module in fused_experts(model)]
    try:
        for module, _ in switched:
            module.set_experts_implementation(EXPORT_EXPERTS)
        path = _path(opset, [old for _, old in switched])
        if switched:
            log.info("export: %s", path)
        yield path
    finally:
        for module, old in switched:
            module.set_experts_implementation(old)


def describe_export(model: torch.nn.Module, opset: int) -> str:
    """How `export_onnx` exports `model` (what `exportable` yields), without changing it."""
    return _path(opset, [m.config._experts_implementation for m in fused_experts(model)])


def _path(opset: int, switched_from: list[str]) -> str:
    path = TORCHSCRIPT.format(opset=opset)
    if switched_from:
        path += (f"; transformers experts_implementation={EXPORT_EXPERTS} while exporting "
                 f"(was {', '.join(sorted(set(switched_from)))})")
    return path


@contextlib.contextmanager
def captured_output(what: str):
    """Route this process's stdout and stderr (file descriptors 1 and 2, so C++ prints too) to a temporary
    file while the block runs; log what was written at DEBUG, under `what`."""
    with contextlib.suppress(ValueError, OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors 1 and 2 to redirect (a detached process): nothing reaches a terminal anyway
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("%s printed %d lines:\n%s", what, text.count("\n") + 1, text)


def last_error(error: BaseException) -> str:
    """The exporter's own last error as one line (its message can carry a whole graph)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= 300 else line[:299] + "…"


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
