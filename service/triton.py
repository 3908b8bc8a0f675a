"""Triton's extensions in Triton's JSON shapes: model configuration and statistics (the repository index is
service.control's).

They let Triton's own clients and tools (tritonclient, perf_analyzer) talk to this server unmodified.
"""

from __future__ import annotations

from pathlib import Path

from service.repository import Repository
from service.revision import Revision, Servable

# our backend -> Triton's (platform, backend) names for the same kind of model file
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnxruntime"), "tensorrt": ("tensorrt_plan", "tensorrt"),
             "torch": ("pytorch_libtorch", "pytorch")}
# the server's limits a client meets (service.settings), reported in each model's configuration parameters
REPORTED_LIMITS = ("max_body_bytes", "max_inflight", "max_response_bytes", "max_json_response_bytes",
                   "body_timeout_s", "min_upload_bytes_per_s")
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "schedule_policy", "parameters",
              "model_repository"]


def platform(backend: str) -> str:
    return PLATFORMS.get(backend, (backend, backend))[0]


def instance_kind(servable: Servable) -> str:
    """KIND_GPU when the engine runs on a GPU (TensorRT always; ONNX Runtime with a CUDA/TensorRT provider first;
    torch on cuda), else KIND_CPU: from the loaded engine, not from a guess."""
    if servable.labels["backend"] == "tensorrt":
        return "KIND_GPU"
    device = str(servable.engine.describe().get("device", "cpu"))
    return "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"


def model_file(servable: Servable) -> Path | None:
    """The file the engine was loaded from (ONNX model, TensorRT plan, pickled torch module)."""
    engine = servable.engine
    path = getattr(engine, "plan_path", None) or getattr(engine, "path", None) or getattr(engine, "source", None)
    return Path(path) if isinstance(path, str | Path) else None


def model_config(repo: Repository, entry: Revision, version: str | None) -> dict:
    """Triton's model configuration (JSON form of config.pbtxt); dims exclude the batch axis."""
    manifest = entry.manifest
    servable = repo.get(entry.name, version)
    batcher = servable.batcher
    backend = servable.labels["backend"]
    file = model_file(servable)
    if file is not None and file.is_relative_to(repo.settings.repo):
        file = file.relative_to(repo.settings.repo)
    config = {
        "name": entry.name,
        "platform": platform(backend),
        "backend": PLATFORMS.get(backend, (backend, backend))[1],
        "version_policy": {"specific": {"versions": manifest.servable()}},
        "max_batch_size": batcher.max_batch_size,
        "input": [_tensor(t.name, t.datatype, t.shape[1:]) for t in manifest.inputs],
        "output": [_tensor(t.name, t.datatype, t.shape[1:]) for t in manifest.outputs],
        "dynamic_batching": {
            "preferred_batch_size": sorted(batcher.preferred),
            "max_queue_delay_microseconds": int(batcher.max_queue_delay_s * 1e6),
            # priority 1 first; requests without one (0) are served after every explicit level
            "default_queue_policy": {"max_queue_size": batcher.max_queue_size, "timeout_action": "REJECT",
                                     "allow_timeout_override": True, "default_timeout_microseconds": 0},
        },
        "instance_group": [{"name": f"{entry.name}_{servable.variant}", "kind": instance_kind(servable), "count": 1}],
        "parameters": {"variant": {"string_value": servable.variant},
                       "revision": {"string_value": entry.label},  # which conversion serves
                       "exact": {"string_value": str(manifest.variants[servable.variant].exact).lower()},
                       **{name: {"string_value": str(getattr(repo.settings, name))} for name in REPORTED_LIMITS}},
        "model_transaction_policy": {"decoupled": False},
    }
    if file is not None:
        config["default_model_filename"] = file.name
        config["parameters"]["model_file"] = {"string_value": str(file)}
    return config


def _tensor(name: str, datatype: str, dims: list[int]) -> dict:
    return {"name": name, "data_type": f"TYPE_{datatype}", "dims": list(dims)}


def statistics(repo: Repository, model: str | None, version: str | None) -> dict:
    if model is None:
        servables = repo.servables()
    elif version is None:
        servables = list(repo.entry(model).variants.values())
    else:
        servables = [repo.get(model, version)]
    return {"model_stats": [s.stats.dump(s.model, s.variant) for s in servables]}
