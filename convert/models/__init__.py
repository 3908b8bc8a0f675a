"""Model sources: built-in demo models and loaders for local model directories.

`load_source(source)` turns a SOURCE argument (a built-in name such as `vit-digits`, or a local Hugging
Face model directory) into a `Source`: the eval-mode torch model plus everything conversion needs to
export and verify it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # only an annotation here: importing engines would pull pydantic into torch-only scripts
    from engines.manifest import TensorInfo


class SourceError(ValueError):
    """SOURCE is not a known built-in model nor a loadable local model directory."""


@dataclass
class Source:
    name: str                              # e.g. "vit-digits" or the directory's name
    description: str                       # one line, shown by the CLI and written into the manifest
    model: torch.nn.Module                 # eval mode; takes the inputs below as keyword arguments
    inputs: list[TensorInfo]               # batch-first; -1 for dynamic axes (batch, and sequence for text)
    outputs: list[TensorInfo]
    task: str                              # "image-classification", "causal-lm", "feature-extraction", ...
    # n -> a batch of n held-out inputs (numpy, keyed by input name) for parity checks and benchmarks
    sample_inputs: Callable[[int], dict[str, np.ndarray]] = field(repr=False, default=None)  # type: ignore[assignment]
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"test_accuracy": 0.97}
    # a task metric evaluated on held-out data for any candidate model (None when the source has no labels)
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = field(repr=False, default=None)
    # n -> n inputs to calibrate quantization ranges on, disjoint from sample_inputs and from what `evaluate`
    # scores (None: the pipeline takes sample_inputs beyond the held-out ones)
    calibration_inputs: Callable[[int], dict[str, np.ndarray]] | None = field(repr=False, default=None)


# built-in name -> "module:function" returning a Source; imported lazily (training happens on demand).
BUILTINS: dict[str, str] = {
    "vit-digits": "convert.models.vit_digits:vit_digits",
    "vit-digits-un": "convert.models.vit_digits:vit_digits_un",
    "vit-digits-pn": "convert.models.vit_digits:vit_digits_pn",
}


def load_source(source: str, *, progress: bool = False) -> Source:
    """Resolve SOURCE: a built-in name, or a local Hugging Face model directory."""
    if source in BUILTINS:
        module_name, function_name = BUILTINS[source].split(":")
        return getattr(importlib.import_module(module_name), function_name)(progress=progress)
    path = Path(source)
    if path.is_dir():
        from convert.models.hf import load_hf_directory

        return load_hf_directory(path)
    raise SourceError(
        f"SOURCE {source!r} is neither a built-in model ({', '.join(BUILTINS)}) nor a local directory. "
        "Give a built-in name or the path of a Hugging Face model directory holding config.json and "
        "*.safetensors weights."
    )
