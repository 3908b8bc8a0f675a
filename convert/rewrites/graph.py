"""The exported graph of a model, read back in terms of its modules: norms, their readers, the residual stream.

`Graph` (built by `analysis.trace`) maps graph nodes to the model's modules and tensors (through each
node's `nn_module_stack` and the export signature) and computes the `Analysis` the rewrites plan from.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from convert.rewrites.graph_ops import (
    _ADDS,
    _IDENTITY,
    _IGNORED,
    _ZEROS,
    _arg,
    _backward_axis,
    _batched_weight,
    _broadcast_axis,
    _conv_form,
    _feature_axis,
    _forward_axis,
    _grouped_weight,
    _is_conv,
    _is_writer_op,
    _last_of_sum,
    _ndim,
    _op,
    _passes_through,
    _paths,
    _prod,
    _shape,
    _transposed_weight,
    _weight_arg,
)
from convert.rewrites.math import EXPERTS_IN_OUT, EXPERTS_OUT_IN, IN_OUT, OUT_IN
from convert.rewrites.probe import NormSpec, find_norms
from convert.rewrites.records import Analysis, LinearSite, NormUse, Stream, Writer

aten = torch.ops.aten


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
        if linear and linear[0] is node and axis == _feature_axis(user, node):
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
        elif node.target in (*_ADDS, aten.cat.default, aten.mul.Tensor, aten.index_add.default, aten.sum.dim_IntList) \
                or _passes_through(node):
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
        if node.target == aten.sum.dim_IntList:  # MoE combine: each token's top-k expert outputs summed
            return self._summed(node, axis, blockers)
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

    def _summed(self, node: fx.Node, axis: int, blockers: list[str]):
        """The source of a sum over other axes (a sum of zero-mean vectors is zero-mean)."""
        source = node.args[0]
        dims = {d % _ndim(source) for d in (node.args[1] or range(_ndim(source)))}
        kept = list(range(_ndim(source))) if _arg(node, 2) else [a for a in range(_ndim(source)) if a not in dims]
        if node.kwargs or axis >= len(kept) or kept[axis] in dims:
            blockers.append(f"{self._where(node)} sums the residual stream along its hidden axis")
            return []
        return [(source, kept[axis])]

    def _writer(self, node: fx.Node, axis: int, blockers: list[str]) -> Writer | None:
        if node in self.member:  # a Post-LN (or embedding) norm's output: centred where it leaves the norm
            return Writer("norm", self.member[node], "", axis)
        elif (linear := self._linear(node)) and axis == _feature_axis(node, node):
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
        elif _grouped_weight(node) is not None:  # fused experts: x @ W[e].T (or x @ W[e]) per expert's rows
            (weight, transposed), x, bias = _grouped_weight(node), node.args[0], None
            layout = EXPERTS_IN_OUT if transposed else EXPERTS_OUT_IN
        elif _batched_weight(node) is not None:  # fused experts: W[ids] gathered per row, one batched matmul
            (weight, x, transposed), bias = _batched_weight(node), None
            layout = EXPERTS_IN_OUT if transposed else EXPERTS_OUT_IN
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


def _has_shift(use: NormUse) -> bool:
    bias = getattr(use.module, use.spec.bias) if use.spec is not None and use.spec.bias else None
    return bias is not None and bool(bias.detach().any())
