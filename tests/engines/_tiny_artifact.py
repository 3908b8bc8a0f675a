"""One tiny artifact for the engine tests: a LayerNorm + Linear model converted by the real pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from convert.models import Source
from engines.manifest import TensorInfo

IN, OUT = 6, 3


class Tiny(torch.nn.Module):
    """y = Linear(LayerNorm(x)); deterministic weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(IN)
        self.head = torch.nn.Linear(IN, OUT)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def sample(n: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((n, IN)).astype(np.float32)}


def tiny_source() -> Source:
    return Source(
        name="tiny", description="LayerNorm + Linear", model=Tiny().eval(),
        inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, IN])],
        outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, OUT])],
        task="regression", sample_inputs=sample,
    )


def expected(x: np.ndarray) -> np.ndarray:
    """The tiny model's answer in float64 (the reference every engine must match)."""
    model = Tiny().double().eval()
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float64))).numpy()


def build_repo(repo: Path, *, include_bound: bool = True) -> Path:
    """Convert the tiny model into repo/tiny (unfused, plus the benchmark-only nonorm bound)."""
    from convert.pipeline import ConvertOptions, convert

    options = ConvertOptions(variants=["unfused"], include_bound=include_bound, samples=8, benchmark=False,
                             progress=False)
    convert(tiny_source(), "tiny", repo, options)
    return repo / "tiny"
