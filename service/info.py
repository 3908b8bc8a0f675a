"""Health, metadata, configuration, statistics and the repository index as plain functions over the repository:
the REST routes and the gRPC service both answer from these (each only translates the result or the error)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from service.control import ModelControl
from service.errors import ModelNotReady, NotLive
from service.plans import parameters as plan_parameters
from service.protocol import ModelMetadata, ServerMetadata, TensorMetadata
from service.repository import Repository
from service.triton import EXTENSIONS, model_config, platform, statistics  # noqa: F401 - statistics re-exported


def check_live(repo: Repository) -> None:
    """NotLive (503) once an engine call has not come back past engine_timeout_s + engine_recovery_s."""
    hung = repo.hung()
    if hung:
        raise NotLive("an engine call has not come back; restart the server: " + "; ".join(hung))


def check_ready(serving: bool, repo: Repository) -> None:
    """ModelNotReady (with the reason) unless the server is serving and some model is ready; in explicit mode
    too, a server with no model loaded is not ready (a load request makes it ready)."""
    if not serving:
        raise ModelNotReady("the server is starting or shutting down")
    if not any(entry.ready for entry in repo.models.values()):
        reasons = "; ".join(f"{n}: {e.reason}" for n, e in repo.models.items()) or "no model is loaded"
        raise ModelNotReady("no model is ready: " + reasons)


def server_metadata() -> ServerMetadata:
    try:
        release = package_version("normfuse")
    except PackageNotFoundError:
        release = "unknown"
    return ServerMetadata(name="normfuse", version=release, extensions=EXTENSIONS)


def model_metadata(repo: Repository, model: str, version: str | None) -> ModelMetadata:
    servable = repo.get(model, version)
    manifest = repo.entry(model).manifest
    return ModelMetadata(
        name=model,
        versions=manifest.servable(),
        platform=platform(servable.labels["backend"]),
        inputs=[TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in servable.engine.inputs],
        outputs=[TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in servable.engine.outputs],
        parameters={"variant": servable.variant, "exact": manifest.variants[servable.variant].exact,
                    **plan_parameters(manifest, servable.variant)},
    )


def check_model_ready(repo: Repository, model: str, version: str | None) -> None:
    """ModelNotFound (unknown model or version) or ModelNotReady (with the reason) unless it serves."""
    entry = repo.entry(model)
    if version is None and not entry.ready:
        raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
    repo.get(model, version)  # 404 for an unknown version, 503 with the reason for a failed one


def config(repo: Repository, model: str, version: str | None) -> dict[str, Any]:
    return model_config(repo, repo.entry(model), version)


def repository_index(control: ModelControl, ready_only: bool) -> list[dict]:
    """Triton's repository index: every model of the repository, loaded or not (service.control builds it)."""
    return control.index(ready_only)
