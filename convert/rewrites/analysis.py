"""Where the norms, their readers and the residual stream's writers are.

A dataflow analysis of the ATen graph that `torch.export` produces, lifted back to modules through each
node's `nn_module_stack`. Nothing here knows a model family's module names or classes: norms are found
by what they compute (`convert.rewrites.probe`), and a layer's bias is the one its op reads in the graph.

- A norm's *readers* are the linear layers (nn.Linear, HF Conv1D, nn.MultiheadAttention's in_proj, any
  `linear`/`addmm` on a parameter; an ungrouped, unpadded conv for a channels-first norm) that its output
  reaches through ops that do not mix the hidden axis.
- The *residual stream* is every tensor that flows into a norm's input through `add`, `cat` on another
  axis and such pass-through ops; its *writers* are where those paths start (linear/conv outputs,
  embedding lookups, parameters, model inputs). Anything else that writes or reads it is a *blocker*.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from convert.rewrites import NotApplicable
from convert.rewrites.math import IN_OUT, OUT_IN
from convert.rewrites.probe import NormSpec, probe_norm

log = logging.getLogger(__name__)
aten = torch.ops.aten
# ops that move data without mixing values along the hidden axis (the axis is re-derived from shapes)
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
             aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
             aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.lift_fresh_copy.default}
_ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default}


@dataclass(frozen=True)
class LinearSite:
    """A weight (and its bias slot) that a linear op reads: module path + attribute names + layout."""

    module: str
    weight: str
    bias: str  # the bias the op reads; "" when it reads none and the module has no slot its forward reads
    layout: str  # OUT_IN (nn.Linear, Conv2d) or IN_OUT (HF Conv1D)


@dataclass(frozen=True)
class Writer:
    """One start of the residual stream."""

    # "linear" (W, b centred over outputs), "tensor" (a parameter/buffer), "input" (a model input),
    # "norm" (a norm's output: a Post-LN prefix or an embedding LN, centred by an inserted op),
    # "scaled" (a per-channel scale `attr` on the output of the linear `site`: folded into it, then centred)
    kind: str
    module: str
    attr: str  # the tensor's attribute (the weight for "linear"; the input's name for "input")
    axis: int  # the hidden axis of that tensor
    site: LinearSite | None = None


@dataclass
class NormUse:
    name: str
    module: nn.Module
    kind: str  # "layernorm", "rmsnorm", or "unknown" (norm-like, no exact form: see spec.problem)
    readers: list[LinearSite] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # why γ/β cannot be folded into the readers
    spec: NormSpec | None = None  # what the probe found it computes (eps, channel axis, affine form)


@dataclass
class Stream:
    """A set of tensors read only by norms (in a Pre-LN model: the one residual stream)."""

    norms: list[str]  # the norms reading it
    writers: list[Writer]
    blockers: list[str]  # why it cannot be re-centred
    width: int | None  # its width d

    @property
    def boundaries(self) -> list[str]:
        """Norms whose output writes this stream (Post-LN prefix, embedding LN): need a centring op."""
        return [w.module for w in self.writers if w.kind == "norm"]


@dataclass
class Analysis:
    norms: dict[str, NormUse]
    streams: list[Stream]

    @property
    def writers(self) -> list[Writer]:
        return [w for stream in self.streams for w in stream.writers]

    @property
    def stream_blockers(self) -> list[str]:
        return list(dict.fromkeys(b for stream in self.streams for b in stream.blockers))

    @property
    def width(self) -> int | None:
        widths = {stream.width for stream in self.streams}
        return widths.pop() if len(widths) == 1 else None

    def describe(self) -> dict:
        """A JSON-able account of what was found and why a rewrite would be refused (for manifests, CLIs)."""
        return {
            "width": self.width,
            "norms": {name: {"kind": use.kind, "readers": [f"{s.module}.{s.weight}" for s in use.readers],
                             "blockers": use.blockers} for name, use in self.norms.items()},
            "stream_writers": [f"{w.kind} {'.'.join(p for p in (w.module, w.attr) if p)}" for w in self.writers],
            "stream_blockers": self.stream_blockers,
            "streams": [{"norms": s.norms, "boundaries": s.boundaries, "blockers": s.blockers} for s in self.streams],
        }


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


def find_norms(model: nn.Module) -> dict[str, NormSpec]:
    """Every norm-like module by name with what it computes (a spec with `problem` when no exact form fits)."""
    return {name: spec for name, m in model.named_modules() if (spec := probe_norm(m)) is not None}


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
        from convert.rewrites.check import first_line

        log.debug("torch.export failed on %s", type(model).__name__, exc_info=True)  # the graph dump, if any
        raise NotApplicable(f"{type(model).__name__} could not be traced with torch.export: {first_line(error)}") from error
    finally:
        model.train(training)
    return Graph(model, program)


class Graph:
    """The exported graph plus the maps from its nodes back to the model's modules and tensors."""

    def __init__(self, model: nn.Module, program: torch.export.ExportedProgram):
        self.model, self.nodes = model, list(program.graph.nodes)
        sig = program.graph_signature
        self.placeholders = {**{k: ("param", v) for k, v in sig.inputs_to_parameters.items()},
                             **{k: ("buffer", v) for k, v in sig.inputs_to_buffers.items()},
                             **{k: ("constant", v) for k, v in sig.inputs_to_lifted_tensor_constants.items()},
                             **{k: ("input", k) for k in sig.user_inputs}}
        self.specs = find_norms(model)
        self.norm_nodes = {name: [n for n in self.nodes if name in _paths(n)] for name in self.specs}
        self.member = {n: name for name, nodes in self.norm_nodes.items() for n in nodes}

    def analyse(self) -> Analysis:
        norms, walks = {}, []
        for name, nodes in self.norm_nodes.items():
            module, spec = self.model.get_submodule(name), self.specs[name]
            use = norms[name] = NormUse(name, module, spec.kind, spec=spec)
            if spec.problem:
                use.blockers.append(f"{name}: {spec.problem}")
            if not nodes:
                continue  # never called: nothing reads or writes through it
            boundary = self._boundary(name, nodes)
            if isinstance(boundary, str):
                use.blockers.append(boundary)
                walks.append(([name], {}, [], [boundary]))
                continue
            source, output = boundary
            self._collect_readers(use, output, spec.axis % _ndim(output))
            stream, starts, blockers = {}, [], []
            self._walk_back(source, spec.axis % _ndim(source), stream, starts, blockers)
            walks.append(([name], stream, starts, blockers))
        return Analysis(norms, [self._stream(*walk) for walk in _merge_overlapping(walks)])

    def readers_of(self, name: str, spec: NormSpec) -> NormUse:
        """The linear readers (and blockers) of module `name`'s output along `spec.axis`: the same reader rules
        for a norm with fixed statistics (UnifiedNorm, PowerNorm: `spec.kind` "affine") as for any norm."""
        use = NormUse(name, self.model.get_submodule(name), spec.kind, spec=spec)
        nodes = [n for n in self.nodes if name in _paths(n)]
        if nodes:
            boundary = self._boundary(name, nodes)
            if isinstance(boundary, str):
                use.blockers.append(boundary)
            else:
                self._collect_readers(use, boundary[1], spec.axis % _ndim(boundary[1]))
        return use

    def _stream(self, names: list[str], stream: dict, starts: list, blockers: list[str]) -> Stream:
        writers = [w for w in (self._writer(n, stream[n], blockers) for n in starts) if w]
        # a bias added after a matmul (x @ W.T + b) is the linear writer's bias: written once, through it
        biases = {(w.site.module, w.site.bias) for w in writers if w.kind == "linear" and w.site.bias}
        writers = [w for w in writers if not (w.kind == "tensor" and (w.module, w.attr) in biases)]
        self._check_stream_readers(stream, set(names), blockers)
        self._check_shared_weights(stream, blockers)
        widths = {int(_shape(n)[a]) for n, a in stream.items()}
        if len(widths) > 1:
            blockers.append(f"the residual stream read by {names[0]} has several widths {sorted(widths)}")
        return Stream(names, writers, list(dict.fromkeys(blockers)), widths.pop() if len(widths) == 1 else None)

    # --- norms -----------------------------------------------------------------------------------
    def _boundary(self, name: str, nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node] | str:
        inside = set(nodes)
        sources = {a for n in nodes for a in n.all_input_nodes if a not in inside and not self._is_weight(a)}
        outputs = [n for n in nodes if any(u not in inside for u in n.users) and not self._input_alias(n)]
        if len(sources) != 1 or len(outputs) != 1:
            return f"{name} is not called exactly once on one input (found {len(sources)} inputs, {len(outputs)} outputs)"
        return sources.pop(), outputs[0]

    def _collect_readers(self, use: NormUse, node: fx.Node, axis: int) -> None:
        for user in node.users:
            if user.target in _IGNORED | _ZEROS:  # shape-only readers
                continue
            site = self._reader(user, node, axis, use)
            if site is not None:
                use.readers.append(site)
                if self._uses(user, _weight_arg(user)):
                    use.blockers.append(f"{site.module}.{site.weight} is also used elsewhere")
                if not site.bias and _has_shift(use):
                    use.blockers.append(f"{site.module} has no bias that its forward reads, to receive {use.name}'s β")
            elif (new_axis := _forward_axis(user, node, axis)) is not None:
                self._collect_readers(use, user, new_axis)

    def _reader(self, user: fx.Node, node: fx.Node, axis: int, use: NormUse) -> LinearSite | None:
        """The linear layer `user` when it reads `node` along its input axis (None when it is no linear op;
        a blocker when it is a conv that cannot take the fold)."""
        linear = self._linear(user)
        if linear and linear[0] is node and axis == _ndim(node) - 1:
            return linear[1]
        if _is_conv(user) and user.args[0] is node and axis == 1:
            transposed, groups, padded = _conv_form(user)
            if not (transposed or groups != 1 or padded) and self._is_weight(user.args[1]):
                module, attr = self._owner(user, user.args[1])
                return LinearSite(module, attr, self._bias_slot(user, _arg(user, 2), module), OUT_IN)
            what = "a transposed" if transposed else "a grouped" if groups != 1 else "a zero-padded"
            use.blockers.append(f"{use.name} is read by {what} convolution {self._where(user)}, which cannot take its γ/β")
            return None
        if _forward_axis(user, node, axis) is None:
            use.blockers.append(f"{use.name} is read by {self._where(user)} through {_op(user)}, not by a linear layer")
        return None

    # --- the residual stream ---------------------------------------------------------------------
    def _walk_back(self, node: fx.Node, axis: int, stream: dict, starts: list, blockers: list[str]) -> None:
        if node in stream:
            if stream[node] != axis:
                blockers.append(f"{self._where(node)} holds the residual stream on two different axes")
            return
        stream[node] = axis
        if self._input_alias(node):
            self._walk_back(node.args[0], axis, stream, starts, blockers)
        elif (node in self.member or node.op == "placeholder" or self._linear(node) or _is_writer_op(node)
              or self._scaled_linear(node, axis)):
            starts.append(node)  # a start of the stream; classified by _writer
        elif node.target in _ZEROS:
            return  # a zero tensor (e.g. the accumulator of an MoE combine) is zero-mean already
        elif node.target in (*_ADDS, aten.cat.default, aten.mul.Tensor, aten.index_add.default) or \
                _passes_through(node):
            for source, source_axis in self._sources(node, axis, blockers):
                self._walk_back(source, source_axis, stream, starts, blockers)
        else:
            blockers.append(f"{self._where(node)} writes the residual stream through {_op(node)}, which is not affine")

    def _sources(self, node: fx.Node, axis: int, blockers: list[str]):
        if node.target == aten.cat.default:
            if (node.args[1] if len(node.args) > 1 else 0) % _ndim(node) == axis:
                blockers.append(f"{self._where(node)} concatenates along the hidden axis of the residual stream")
            return [(t, axis) for t in node.args[0]]
        if node.target == aten.mul.Tensor:  # a per-token scale (constant, MoE gate) keeps x zero-mean
            carriers = [(a, _broadcast_axis(node, a, axis)) for a in node.args[:2] if isinstance(a, fx.Node)]
            carriers = [(a, a_axis) for a, a_axis in carriers if a_axis is not None]
            if len(carriers) != 1:
                blockers.append(f"{self._where(node)} multiplies the residual stream elementwise along its hidden axis")
            return carriers[:1]
        if node.target == aten.index_add.default:  # MoE combine: rows added along another axis
            if node.args[1] % _ndim(node) == axis or len(node.args) > 4 or node.kwargs:
                blockers.append(f"{self._where(node)} index_adds along the hidden axis of the residual stream")
                return []
            return [(node.args[0], axis), (node.args[3], axis)]
        if node.target in _ADDS:  # an in-place add_ (Falcon) reads as an add; its first operand's other
            # readers are readers of the stream and are refused by _check_stream_readers
            if not all(isinstance(a, fx.Node) for a in node.args[:2]) or node.kwargs.get("alpha", 1) != 1:
                blockers.append(f"{self._where(node)} adds a constant to the residual stream")
                return []
            found = [(a, _broadcast_axis(node, a, axis)) for a in node.args[:2]]
        else:
            found = [(node.args[0], _backward_axis(node, node.args[0], axis))]
        if any(a is None for _, a in found):
            blockers.append(f"{self._where(node)} broadcasts or reshapes the hidden axis of the residual stream")
            return []
        return found

    def _writer(self, node: fx.Node, axis: int, blockers: list[str]) -> Writer | None:
        if node in self.member:  # a Post-LN (or embedding) norm's output: centred where it leaves the norm
            return Writer("norm", self.member[node], "", axis)
        elif (linear := self._linear(node)) and axis == _ndim(node) - 1:
            return Writer("linear", linear[1].module, linear[1].weight, axis, linear[1])
        elif scaled := self._scaled_linear(node, axis):
            return scaled
        elif _is_writer_op(node):
            return self._op_writer(node, axis, blockers)
        elif node.op == "placeholder":
            kind, name = self.placeholders[node.name]
            if kind == "input":
                return Writer("input", "", name, axis)
            if kind == "constant":
                blockers.append(f"the constant {name} writes the residual stream and cannot be re-centred")
                return None
            module, attr = name.rpartition(".")[::2]
            return Writer("tensor", module, attr, axis)
        else:
            blockers.append(f"{self._where(node)} writes the residual stream through {_op(node)} on another axis")
        return None

    def _op_writer(self, node: fx.Node, axis: int, blockers: list[str]) -> Writer | None:
        weight_index, want_axis = (0, _ndim(node) - 1) if node.target == aten.embedding.default else (1, 1)
        weight = node.args[weight_index]
        if axis != want_axis or not self._is_weight(weight):
            blockers.append(f"{self._where(node)} writes the residual stream through {_op(node)} on another axis")
            return None
        module, attr = self._owner(node, weight)
        if node.target == aten.embedding.default:
            return Writer("tensor", module, attr, 1)
        transposed, groups, _ = _conv_form(node)
        if transposed or groups != 1:  # centring over outputs would mix weights that read different inputs
            blockers.append(f"{self._where(node)} writes the residual stream through a "
                            f"{'transposed' if transposed else 'grouped'} convolution, which cannot be re-centred")
            return None
        return Writer("linear", module, attr, axis, LinearSite(module, attr, self._bias_slot(node, _arg(node, 2), module),
                                                               OUT_IN))

    def _check_stream_readers(self, stream: dict[fx.Node, int], names: set[str], blockers: list[str]) -> None:
        for node in stream:
            for user in node.users:
                if user in stream and self._starts_stream(user):
                    blockers.append(f"{self._where(user)} writes the residual stream and also reads it through {_op(user)}")
                    continue
                if user in stream or user.target in _IGNORED | _ZEROS:
                    continue
                if self.member.get(user) in names and node in user.all_input_nodes:
                    continue  # a norm reading the stream: mean-invariant for LayerNorm (checked by the rewrite)
                user = _last_of_sum(user)  # a sum that no norm reads: say who reads it in the end
                how = "the model output" if user.op == "output" else f"{self._where(user)} through {_op(user)}"
                if node in self.member:
                    blockers.append(f"{self.member[node]} is Post-LN: its output is the residual stream, read by {how}")
                elif user.op == "output":
                    blockers.append(f"{type(self.model).__name__} returns the residual stream "
                                    f"(from {self._where(node)}) without a norm")
                else:
                    blockers.append(f"{how} reads the residual stream")

    def _starts_stream(self, node: fx.Node) -> bool:
        """A writer (start) of the stream, as opposed to an op the stream passes through."""
        return bool(self._linear(node) or _is_writer_op(node))

    def _check_shared_weights(self, stream: dict[fx.Node, int], blockers: list[str]) -> None:
        """A re-centred weight must feed nothing but the stream (tied copies are untied by the rewrite)."""
        for node in stream:
            if not (_is_writer_op(node) or self._linear(node)):
                continue
            weight = _weight_arg(node)
            for other in self._uses(node, weight):
                if other not in stream:
                    blockers.append(f"{'.'.join(self._owner(node, weight))} writes the residual stream "
                                    f"but is also read by {self._where(other)}")

    def _uses(self, node: fx.Node, weight: fx.Node) -> list[fx.Node]:
        """The nodes that read `weight` through the same module attribute as `node` does."""
        owner = self._owner(node, weight)
        return [u for u in weight.users
                if u is not node and u not in node.all_input_nodes and self._owner(u, weight) == owner]

    # --- helpers ---------------------------------------------------------------------------------
    def _linear(self, node: fx.Node) -> tuple[fx.Node, LinearSite] | None:
        """(input, site) when `node` is a linear op whose weight is a parameter."""
        if node.target == aten.linear.default:
            x, weight, bias, layout = node.args[0], node.args[1], _arg(node, 2), OUT_IN
        elif node.target == aten.addmm.default and not node.kwargs:
            bias, x, weight, layout = *node.args[:3], IN_OUT
        elif _transposed_weight(node) is not None:  # x @ W.T (Falcon's FalconLinear)
            x, weight, bias, layout = node.args[0], _transposed_weight(node), None, OUT_IN
        else:
            return None
        if not self._is_weight(weight) or (bias is not None and not self._is_weight(bias)):
            return None
        module, attr = self._owner(node, weight)
        return x, LinearSite(module, attr, self._bias_slot(node, bias, module), layout)

    def _bias_slot(self, node: fx.Node, bias: fx.Node | None, module: str) -> str:
        """The bias the op reads (from the graph); without one, `bias` only where the module's forward is
        known to read that slot (torch's Linear and Conv read self.bias even when it is None)."""
        if bias is not None:
            return self._owner(node, bias)[1]
        owner = self.model.get_submodule(module)
        known = isinstance(owner, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and "bias" in owner._parameters
        return "bias" if known else ""

    def _scaled_linear(self, node: fx.Node, axis: int) -> Writer | None:
        """A per-channel parameter scaling a linear layer's output (LayerScale: DINOv2, CaiT)."""
        if node.target != aten.mul.Tensor or axis != _ndim(node) - 1:
            return None
        for scale, x in (node.args[:2], node.args[1::-1]):
            scale_axis = _broadcast_axis(node, scale, axis) if self._is_weight(scale) else None
            if scale_axis is None or _prod(_shape(scale)) != _shape(node)[axis] or not isinstance(x, fx.Node):
                continue
            while (x.target in _IDENTITY or x.target == aten.dropout.default and _passes_through(x)) \
                    and len(x.users) == 1:
                x = x.args[0]
            linear = self._linear(x)
            if linear and len(x.users) == 1 and not self._uses(x, _weight_arg(x)):
                return Writer("scaled", *self._owner(node, scale), scale_axis, linear[1])
        return None

    def _input_alias(self, node: fx.Node) -> bool:
        """A no-op cast inside a norm of its own input (x.to(float32) on float32): tracing hands that
        same tensor to later readers of the input (e.g. the residual add), so it stands for the input."""
        source = node.args[0] if node.target in _IDENTITY and node.args else None
        return (node in self.member and isinstance(source, fx.Node) and self.member.get(source) != self.member[node]
                and node.meta["val"].dtype == source.meta["val"].dtype)

    def _is_weight(self, node) -> bool:
        return isinstance(node, fx.Node) and self.placeholders.get(node.name, ("",))[0] in ("param", "buffer")

    def _owner(self, node: fx.Node, placeholder: fx.Node) -> tuple[str, str]:
        """(module path, attribute) of a parameter as seen by `node`'s module (this resolves tied weights)."""
        fqn = self.placeholders[placeholder.name][1]
        tensor = _get(self.model, fqn)
        path = _paths(node)[-1] if _paths(node) else ""
        scope = self.model.get_submodule(path)
        names = [n for n, p in scope.named_parameters(remove_duplicate=False) if p is tensor]
        names += [n for n, b in scope.named_buffers(remove_duplicate=False) if b is tensor]
        if names:
            fqn = ".".join(p for p in (path, min(names, key=len)) if p)
        return fqn.rpartition(".")[0], fqn.rpartition(".")[2]

    def _where(self, node: fx.Node) -> str:
        paths = _paths(node)
        return paths[-1] if paths and paths[-1] else type(self.model).__name__


def _get(model: nn.Module, fqn: str) -> torch.Tensor:
    module, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def _merge_overlapping(walks: list[tuple]) -> list[tuple]:
    """Norms whose input walks share a node read the same stream: merge them (Pre-LN: one stream)."""
    merged: list[tuple] = []
    for names, stream, starts, blockers in walks:
        for other in [m for m in merged if m[1].keys() & stream.keys()]:
            merged.remove(other)
            for node, axis in other[1].items():
                if stream.setdefault(node, axis) != axis:
                    blockers.append(f"{node.name} holds the residual stream on two different axes")
            names, starts, blockers = other[0] + names, other[2] + starts, other[3] + blockers
        merged.append((names, stream, list(dict.fromkeys(starts)), blockers))
    return merged


def _last_of_sum(node: fx.Node) -> fx.Node:
    while (node.target in _ADDS or _passes_through(node)) and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """W when `node` is matmul(x, W.T) for a 2-D W (its transpose used by nothing else)."""
    if node.target != aten.matmul.default or not isinstance(node.args[1], fx.Node):
        return None
    t = node.args[1]
    swapped = t.target in (aten.t.default, aten.numpy_T.default) or (t.target == aten.transpose.int and {a % 2 for a in t.args[1:3]} == {0, 1}) \
        or (t.target == aten.permute.default and list(t.args[1]) == [1, 0])
    if not swapped or len(t.users) != 1 or not isinstance(t.args[0], fx.Node) or _ndim(t.args[0]) != 2:
        return None
    return t.args[0]


def _weight_arg(node: fx.Node) -> fx.Node:
    if _transposed_weight(node) is not None:
        return _transposed_weight(node)
    return node.args[{aten.embedding.default: 0, aten.addmm.default: 2}.get(node.target, 1)]


def _paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _arg(node: fx.Node, index: int):
    return node.args[index] if len(node.args) > index else None


def _op(node: fx.Node) -> str:
    return "the model output" if node.op == "output" else getattr(node.target, "__name__", str(node.target))


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _ndim(node: fx.Node) -> int:
    return len(_shape(node))


_CONV_TRANSPOSE = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def _is_conv(node: fx.Node) -> bool:
    return node.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                           *_CONV_TRANSPOSE)


def _conv_form(node: fx.Node) -> tuple[bool, int, bool]:
    """(transposed, groups, zero-padded) of a convolution node (False, 1, False for other writers)."""
    if node.target == aten.convolution.default:
        padding, transposed, groups = node.args[4], bool(node.args[6]), int(node.args[8])
    elif node.target in _CONV_TRANSPOSE:
        padding, transposed, groups = _arg(node, 4) or 0, True, int(_arg(node, 6) or 1)
    elif _is_conv(node):
        padding, transposed, groups = _arg(node, 4) or 0, False, int(_arg(node, 6) or 1)
    else:
        return False, 1, False
    padded = padding != "valid" and (any(int(p) for p in padding) if isinstance(padding, list | tuple)
                                     else padding == "same" or bool(padding))
    return transposed, groups, padded


def _has_shift(use: NormUse) -> bool:
    bias = getattr(use.module, use.spec.bias) if use.spec is not None and use.spec.bias else None
    return bias is not None and bool(bias.detach().any())


def _is_writer_op(node: fx.Node) -> bool:
    return node.target == aten.embedding.default or _is_conv(node)


def _passes_through(node: fx.Node) -> bool:
    if node.target == aten.dropout.default:
        return not node.args[2]  # dropout in eval mode
    return node.target in _RESHAPES | _IDENTITY or node.target in (
        aten.transpose.int, aten.permute.default, aten.t.default, aten.select.int, aten.slice.Tensor,
        aten.expand.default)


def _forward_axis(node: fx.Node, source: fx.Node, axis: int) -> int | None:
    """Where the hidden axis `axis` of `source` lands in `node`'s output (None: mixed or dropped)."""
    if not _passes_through(node) or node.args[0] is not source:
        return None
    ins, outs = _shape(source), _shape(node)
    if node.target in _IDENTITY or node.target == aten.dropout.default:
        return axis
    if node.target in (aten.transpose.int, aten.permute.default, aten.t.default):
        order = list(range(len(ins)))
        if node.target == aten.permute.default:
            order = [d % len(ins) for d in node.args[1]]
        else:
            a, b = (node.args[1] % len(ins), node.args[2] % len(ins)) if node.target == aten.transpose.int else (0, 1)
            order[a], order[b] = order[b], order[a]
        return order.index(axis)
    if node.target in (aten.select.int, aten.slice.Tensor):
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(ins)
        if dim == axis:
            return None
        return axis - 1 if node.target == aten.select.int and dim < axis else axis
    if node.target == aten.expand.default:
        out_axis = axis + len(outs) - len(ins)
        return out_axis if outs[out_axis] == ins[axis] else None
    return _reshape_axis(ins, outs, axis)


def _reshape_axis(ins: tuple[int, ...], outs: tuple[int, ...], axis: int) -> int | None:
    """A reshape keeps an axis when the same-sized axis starts at the same flat offset."""
    before = _prod(ins[:axis])
    for out_axis in range(len(outs)):
        if _prod(outs[:out_axis]) == before and outs[out_axis] == ins[axis]:
            return out_axis
    return None


def _backward_axis(node: fx.Node, source: fx.Node, axis: int) -> int | None:
    for source_axis in range(_ndim(source)):
        if _forward_axis(node, source, source_axis) == axis:
            return source_axis
    return None


def _broadcast_axis(node: fx.Node, operand: fx.Node, axis: int) -> int | None:
    operand_axis = axis - (_ndim(node) - _ndim(operand))
    if operand_axis < 0 or _shape(operand)[operand_axis] != _shape(node)[axis]:
        return None
    return operand_axis


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result
