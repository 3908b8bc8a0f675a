"""Where the norms, their readers and the residual stream's writers are.

A dataflow analysis of the ATen graph that `torch.export` produces (`trace`; the walk is `graph.Graph`, its
op helpers `graph_ops`), lifted back to modules through each node's `nn_module_stack`. Nothing here knows a model family's module names or classes: norms are found
by what they compute (`convert.rewrites.probe`), and a layer's bias is the one its op reads in the graph. The
records handed out (`Analysis`, `NormUse`, `Stream`, `Writer`, `LinearSite`) live in `convert.rewrites.records`.

- A norm's *readers* are the linear layers (nn.Linear, HF Conv1D, nn.MultiheadAttention's in_proj, any
  `linear`/`addmm` on a parameter, fused MoE experts' grouped or batched matmuls on a 3-D parameter; an ungrouped,
  unpadded conv for a channels-first norm) that its output reaches through ops that do not mix the hidden
  axis (reshapes, casts, row gathers such as an MoE's token dispatch).
- The *residual stream* is every tensor that flows into a norm's input through `add`, `cat` on another
  axis, sums over other axes (an MoE's top-k combine) and such pass-through ops; its *writers* are where
  those paths start (linear/conv/grouped-expert outputs, embedding lookups, parameters, model inputs).
  Anything else that writes or reads it is a *blocker*.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from convert.rewrites import NotApplicable, first_line
from convert.rewrites.graph import Graph
from convert.rewrites.probe import find_norms, probe_norm  # noqa: F401 - find_norms is read from here too
from convert.rewrites.records import Analysis

log = logging.getLogger(__name__)


def norm_kind(module: nn.Module) -> str | None:
    """'layernorm' / 'rmsnorm' for a module computing one (found by probing it), else None."""
    spec = probe_norm(module)
    return spec.kind if spec is not None and not spec.problem else None


def norm_eps(module: nn.Module) -> float:
    spec = probe_norm(module)
    return spec.eps if spec is not None else torch.finfo(torch.float32).eps


def computes_standard_norm(module: nn.Module) -> bool:
    """Whether the module computes γ⊙x̂ + β (or x̂·(1+w)) over one channel axis with ε inside the root."""
    spec = probe_norm(module)
    return spec is not None and not spec.problem


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keyword inputs to trace `model` with: its own `example_inputs()`, or derived from its config/type."""
    inputs = _builtin_inputs(model)
    parameter = next(p for p in model.parameters() if p.is_floating_point())
    # floating inputs follow the model's dtype and device (the model may have been cast or moved since)
    return {k: v.to(parameter.device, parameter.dtype if torch.is_floating_point(v) else v.dtype)
            if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _builtin_inputs(model: nn.Module) -> dict:
    own = getattr(model, "example_inputs", None)
    if own is not None:
        return dict(own() if callable(own) else own)
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "main_input_name", None) == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(2, config.num_channels, size, size)}
    if config is not None and getattr(model, "main_input_name", None) == "input_ids":
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 7))}
        if "use_cache" in inspect.signature(model.forward).parameters:
            inputs["use_cache"] = False
        return inputs
    if isinstance(model, nn.TransformerEncoder | nn.TransformerEncoderLayer):
        layer = model if isinstance(model, nn.TransformerEncoderLayer) else model.layers[0]
        shape = (2, 5, layer.self_attn.embed_dim) if layer.self_attn.batch_first else (5, 2, layer.self_attn.embed_dim)
        return {"src": torch.randn(*shape)}
    raise NotApplicable(
        f"{type(model).__name__}: cannot build example inputs to trace it; give the model an "
        "`example_inputs()` method returning its keyword inputs"
    )


def call_inputs(model: nn.Module, inputs: dict) -> dict:
    """The keyword inputs as the rewrites call the model: the user's, with any key-value cache switched off
    (Hugging Face decoders return a DynamicCache that torch.export cannot trace, whatever the config says)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is not None:  # floating inputs follow the model's dtype and device (float32 pixels, float64 model)
        inputs = {k: v.to(parameter.device, parameter.dtype if v.is_floating_point() else v.dtype)
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters and "use_cache" not in inputs:
        return {**inputs, "use_cache": False}
    return dict(inputs)


def analyse(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Analysis:
    """Trace `model` and locate its norms, their readers, and the residual stream's writers."""
    return trace(model, inputs).analyse()


def trace(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Graph:
    """The one graph front-end: `model` exported with torch.export (eval mode, cache off) on keyword `inputs`
    (default: its example inputs); NotApplicable with the first line of the reason when it cannot be traced."""
    inputs = call_inputs(model, example_inputs(model) if inputs is None else inputs)
    training = model.training
    try:  # traced in eval mode: the rewrite is of the inference function (dropout off)
        program = torch.export.export(model.eval(), args=(), kwargs=inputs, strict=False)
    except Exception as error:  # noqa: BLE001 - any tracing failure means we cannot prove anything
        log.debug("torch.export failed on %s", type(model).__name__, exc_info=True)  # the graph dump, if any
        raise NotApplicable(f"{type(model).__name__} could not be traced with torch.export: {first_line(error)}") from error
    finally:
        model.train(training)
    return Graph(model, program)
