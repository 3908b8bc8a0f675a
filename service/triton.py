"""Triton's extensions in Triton's JSON shapes: model configuration, statistics, repository index.

They let Triton's own clients and tools (tritonclient, perf_analyzer) talk to this server unmodified.
"""

from __future__ import annotations

from service.repository import ModelEntry, Repository

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_libtorch"}
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "schedule_policy", "parameters"]


def platform(backend: str) -> str:
    return PLATFORMS.get(backend, backend)


def model_config(repo: Repository, entry: ModelEntry, version: str | None) -> dict:
    """Triton's model configuration (JSON form of config.pbtxt); dims exclude the batch axis."""
    manifest = entry.manifest
    servable = repo.get(entry.name, version)
    batcher = servable.batcher
    return {
        "name": entry.name,
        "platform": platform(servable.labels["backend"]),
        "backend": servable.labels["backend"],
        "version_policy": {"specific": {"versions": manifest.servable()}},
        "max_batch_size": batcher.max_batch_size,
        "input": [_tensor(t.name, t.datatype, t.shape[1:]) for t in manifest.inputs],
        "output": [_tensor(t.name, t.datatype, t.shape[1:]) for t in manifest.outputs],
        "dynamic_batching": {
            "preferred_batch_size": sorted(batcher.preferred),
            "max_queue_delay_microseconds": int(batcher.max_queue_delay_s * 1e6),
            "default_queue_policy": {"max_queue_size": batcher._queue.maxsize, "timeout_action": "REJECT",
                                     "allow_timeout_override": True, "default_timeout_microseconds": 0},
        },
        "instance_group": [{"name": f"{entry.name}_{servable.variant}", "kind": "KIND_CPU", "count": 1}],
        "default_model_filename": "model.onnx",
        "parameters": {"variant": {"string_value": servable.variant},
                       "exact": {"string_value": str(manifest.variants[servable.variant].exact).lower()}},
        "model_transaction_policy": {"decoupled": False},
    }


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


def repository_index(repo: Repository, ready_only: bool) -> list[dict]:
    rows = []
    for name, entry in sorted(repo.models.items()):
        versions = entry.manifest.servable() if entry.manifest else [""]
        for version in versions:
            ready = version in entry.variants and entry.variants[version].batcher.alive
            if ready_only and not ready:
                continue
            row = {"name": name, "version": version, "state": "READY" if ready else "UNAVAILABLE"}
            if not ready:
                row["reason"] = entry.failed.get(version) or entry.dead.get(version) or entry.reason
            rows.append(row)
    return rows
