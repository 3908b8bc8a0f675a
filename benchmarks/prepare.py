"""Build the benchmark repository: the demo ViT, a ViT-S/16 at 224² and a GPT-2-small, random weights.

The two Hugging Face models are built from their configs (nothing is downloaded), saved as HF
directories under WORK/src/, and converted with `convert.pipeline` with every exact variant plus the
benchmark-only `nonorm` bound. A model whose manifest already exists is left alone, so `make bench`
converts once and re-measures on later runs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _vit_s16(path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                       num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    ViTForImageClassification(config).eval().save_pretrained(path)


def _gpt2_small(path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(path)  # 12 layers, d=768, 124 M parameters


# name -> (SOURCE for `convert`, or a builder writing an HF directory)
MODELS: dict[str, str | Callable[[Path], None]] = {
    "vit-digits": "vit-digits",
    "vit-s16": _vit_s16,
    "gpt2-small": _gpt2_small,
}


def prepare(repo: Path, work: Path, models: list[str] | None = None, *, threads: int | None = None,
            reconvert: bool = False) -> list[str]:
    """Convert each missing model (every model with `reconvert`) into `repo`; return the names present after."""
    import torch

    from convert.pipeline import ConvertOptions, convert

    repo, work = Path(repo), Path(work)
    ready = []
    for name in models or list(MODELS):
        if reconvert:
            shutil.rmtree(repo / name, ignore_errors=True)
        if (repo / name / "manifest.json").is_file():
            ready.append(name)
            continue
        source = MODELS[name]
        if callable(source):
            directory = work / "src" / name
            if not (directory / "config.json").is_file():
                torch.manual_seed(0)
                source(directory)
            source = str(directory)
        log.info("converting %s into %s (every exact variant + the nonorm bound)", name, repo)
        options = ConvertOptions(include_bound=True, benchmark=False, torch_artifacts=False, samples=8,
                                 threads=threads, progress=False)
        try:
            convert(source, name, repo, options)
        except Exception as exc:  # a model that cannot be converted is reported, the others still run
            log.error("could not convert %s: %s", name, exc)
            continue
        ready.append(name)
    return ready
