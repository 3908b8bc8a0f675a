"""A local Hugging Face model directory (config.json + *.safetensors) as a conversion Source.

Offline by construction: every `from_pretrained` call passes `local_files_only=True` and no tokenizer is
loaded; held-out inputs are seeded random token ids or pixels. The model is loaded with
`attn_implementation="eager"` (exportable) and wrapped so it is called with keyword arguments and returns
one tensor (`logits`, else `last_hidden_state`).
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import torch

from convert.models import Source, SourceError
from engines.manifest import TensorInfo

log = logging.getLogger(__name__)

SEQUENCE = 32  # token count of the held-out samples (the exported graph keeps the sequence axis dynamic)


class KeywordModel(torch.nn.Module):
    """Call an HF model with keyword inputs; return its logits (or last hidden state) as one tensor."""

    def __init__(self, model: torch.nn.Module, extra: dict, example: dict[str, np.ndarray]) -> None:
        super().__init__()
        # plain data only (no closures), so the module pickles into the torch artifact
        self.model, self.extra, self.example = model, extra, example

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword inputs for tracing (what convert.rewrites' graph analysis asks for)."""
        return {k: torch.from_numpy(v) for k, v in self.example.items()}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**inputs, **self.extra)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def load_hf_directory(path: str | Path) -> Source:
    path = Path(path)
    check_directory(path)
    config = _load_config(path)
    task, auto_class = pick_task(config)
    try:
        model = auto_class.from_pretrained(
            path, local_files_only=True, attn_implementation="eager", use_safetensors=True, dtype=torch.float32
        ).eval()
    except (ValueError, KeyError, OSError) as exc:
        raise SourceError(f"{path}: {type(config).__name__} ({config.model_type}) cannot be loaded as "
                          f"{auto_class.__name__}: {exc}") from exc
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "input_ids":
        inputs, sample = _text_inputs(model, config)
    elif main_input == "pixel_values":
        inputs, sample = _image_inputs(config)
    else:
        raise SourceError(f"{path}: unsupported architecture {config.model_type!r}: its input {main_input!r} is "
                          "neither token ids nor pixels")
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    wrapped = KeywordModel(model, extra, sample(2)).eval()
    check_runs(wrapped, path)
    return Source(
        name=path.name, description=f"Hugging Face {type(model).__name__} from {path}", model=wrapped,
        inputs=inputs, outputs=[_output_info(model, config, task, inputs)], task=task, sample_inputs=sample,
    )


def check_runs(model: KeywordModel, path: Path) -> None:
    """SourceError unless the model runs on its own example inputs (before any rewrite or export)."""
    from convert.rewrites import ModelDoesNotRun
    from convert.rewrites.check import ensure_runs

    try:
        ensure_runs(model, model.example_inputs(), hint="does its config.json describe a model that runs?")
    except ModelDoesNotRun as exc:
        raise SourceError(user_names(str(exc), model)) from exc


def check_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a Hugging Face model directory: it has no config.json")
    if not any(path.glob("*.safetensors")):
        raise SourceError(f"{path} has no *.safetensors weights (save the model with "
                          "save_pretrained(..., safe_serialization=True))")


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise SourceError(f"{path}/config.json is not a configuration transformers can read: {exc}") from exc


# a class-name suffix of config.architectures -> the task it serves
TASKS = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForImageClassification", "image-classification"),
         ("ForSequenceClassification", "text-classification"))


def pick_task(config) -> tuple[str, type]:
    """The task and the class to load, from config.architectures (the class that saved the directory).

    A head we serve (causal LM, image or sequence classification) loads as that class; an encoder saved
    as itself (T5EncoderModel, BertModel, ViTModel) loads as itself, for feature extraction. A directory
    without `architectures` loads as AutoModel; another head is refused with the supported list.
    """
    import transformers

    for name in config.architectures or []:
        model_class = getattr(transformers, name, None)
        if model_class is None:
            continue
        task = next((task for suffix, task in TASKS if suffix in name), None)
        if task is None and name.endswith("Model"):
            task = "feature-extraction"
        if task is None:
            raise SourceError(f"{name} ({config.model_type}) is not supported: normfuse serves causal language "
                              "models, image and sequence classifiers, and bare encoders (…Model, e.g. "
                              "T5EncoderModel, BertModel, ViTModel)")
        return task, model_class
    return "feature-extraction", transformers.AutoModel


def user_names(message: str, model: torch.nn.Module) -> str:
    """A message about the wrapped model in the user's terms: their class, their layer names."""
    if not isinstance(model, KeywordModel):
        return message
    message = message.replace(type(model).__name__, type(model.model).__name__)
    return re.sub(r"(?<![\w.])model\.", "", message)  # layer paths as the user's model names them


def _text_inputs(model, config):
    vocab = int(config.vocab_size)
    with_mask = "attention_mask" in inspect.signature(model.forward).parameters
    names = ["input_ids"] + (["attention_mask"] if with_mask else [])
    length = min(SEQUENCE, int(getattr(config, "max_position_embeddings", None) or SEQUENCE))

    def sample(n: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(1234).integers(0, vocab, size=(n, length), dtype=np.int64)
        return {"input_ids": ids} | ({"attention_mask": np.ones_like(ids)} if with_mask else {})

    return [TensorInfo(name=name, datatype="INT64", shape=[-1, -1]) for name in names], sample


def _image_inputs(config):
    channels, size = int(getattr(config, "num_channels", 3)), getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    def sample(n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(1234)
        return {"pixel_values": rng.standard_normal((n, channels, height, width), dtype=np.float32)}

    return [TensorInfo(name="pixel_values", datatype="FP32", shape=[-1, channels, height, width])], sample


def _output_info(model, config, task: str, inputs: list[TensorInfo]) -> TensorInfo:
    if task == "causal-lm":
        return TensorInfo(name="logits", datatype="FP32", shape=[-1, -1, int(config.vocab_size)])
    if task in ("image-classification", "text-classification"):
        return TensorInfo(name="logits", datatype="FP32", shape=[-1, int(config.num_labels)])
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or -1)
    return TensorInfo(name="last_hidden_state", datatype="FP32", shape=[-1, -1, hidden])
