"""What every stage of a conversion works from: the source, the staging directory, the held-out inputs and the
original model's outputs on them. The exact variants (`convert.variant`) and the lossy ones (`convert.lossy`)
both build from a `Context`; neither imports the pipeline that drives them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.memory import ParkedWeights
from convert.models import Source
from convert.quantize import Int8Options

log = logging.getLogger(__name__)


@dataclass
class Context:
    source: Source
    staging: Path
    samples: int
    threads: int | None
    torch_artifacts: bool
    int8: Int8Options | None = None

    def __post_init__(self) -> None:
        import torch

        from convert.verify import run

        self.samples = parity_samples(self.source, self.samples)
        self.held_out = self.source.sample_inputs(self.samples)
        # batch 2 so the exporter cannot specialise on 1, and a shorter sequence than the held-out data so
        # the parity check proves the sequence axis really stayed dynamic
        self.example = shorter(self.source.sample_inputs(2), self.source.inputs)
        # what the rewrites trace the model with: a small held-out batch (models need no example_inputs())
        self.trace = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.source.sample_inputs(2).items()}
        self.reference = run(self.source.model, self.held_out, torch.float32)  # the ORIGINAL model's outputs
        self.weights = ParkedWeights(self.source.model)


OUTPUT_BUDGET = 8 * 1024**2  # output elements kept per parity run (64 MB in float64): GPT-2's logits are 1.6M/sample


def parity_samples(source: Source, wanted: int) -> int:
    """`wanted`, capped so the held-out outputs stay within OUTPUT_BUDGET elements (at least 2 samples)."""
    probe = source.sample_inputs(1)
    length = next((probe[t.name].shape[1] for t in source.inputs if len(t.shape) > 1 and t.shape[1] == -1), 1)
    per_sample = sum(int(np.prod([length if d == -1 else d for d in t.shape[1:]])) for t in source.outputs)
    capped = max(2, min(wanted, OUTPUT_BUDGET // max(per_sample, 1)))
    if capped < wanted:
        log.info("parity on %d samples instead of %d: each sample has %d output values", capped, wanted, per_sample)
    return capped


def shorter(arrays: dict[str, np.ndarray], inputs) -> dict[str, np.ndarray]:
    """Cut every dynamic non-batch axis to 3/4 of its length (at least 1)."""
    out = dict(arrays)
    for info in inputs:
        for axis, dim in enumerate(info.shape[1:], start=1):
            if dim == -1:
                length = out[info.name].shape[axis]
                out[info.name] = np.take(out[info.name], range(max(1, length * 3 // 4)), axis=axis)
    return out
