"""The records of an analysis: where the norms, their readers and the residual stream's writers are.

Plain data, importing nothing of the rewrites: `graph` fills them in, `analysis` hands them out, and the
rewrites plan from them (see `convert.rewrites.analysis` for what each one means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from convert.rewrites.probe import NormSpec


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
