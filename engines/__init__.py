"""Engines: one small runner interface (load / infer / close) over ONNX Runtime, OpenVINO, TensorRT and PyTorch.

Heavy backends are imported lazily: `import engines` needs neither TensorRT nor CUDA.

    with engines.load("model_repository", "vit-digits") as engine:      # the manifest's default variant
        logits = engine.infer({"pixel_values": batch})["logits"]
"""

from __future__ import annotations

import importlib
from pathlib import Path

from engines.base import DATATYPES, Engine, EngineError, InputError, TensorSpec, check_inputs
from engines.manifest import (
    Artifact,
    Manifest,
    ManifestError,
    VariantInfo,
    artifacts,
    check_model_name,
    read_manifest,
    read_revision,
    verify_files,
)
from engines.plans import Plan, find_plan, plan_artifacts

__all__ = [
    "BACKENDS", "DATATYPES", "Engine", "EngineError", "InputError", "ManifestError", "TensorSpec",
    "check_inputs", "load", "open_model", "open_variant", "pick_variant", "read_manifest", "specs",
]

# backend -> "module:function"; the function is (model_dir, manifest, variant, files, **options) -> Engine
# (not yet loaded); `files` is role -> engines.manifest.Artifact, whose read() gives the verified bytes. A backend module adds itself here by name; it is imported only when asked for.
BACKENDS: dict[str, str] = {
    "onnxruntime": "engines:_open_onnxruntime",
    "torch": "engines:_open_torch",
    "tensorrt": "engines.tensorrt:open_variant",
    "openvino": "engines.openvino:open_variant",
}


def open_model(repo: str | Path, name: str) -> tuple[Manifest, Path]:
    """Read REPO/NAME/manifest.json (held to its directory: engines.manifest.read_revision); return it with the
    model's directory."""
    model_dir = Path(repo) / check_model_name(name)
    if not model_dir.is_dir():
        from engines.manifest import list_models

        known = list_models(Path(repo))
        raise ManifestError(
            f"no model {name!r} in repository {repo} (models there: {', '.join(known) or 'none'}); "
            f"run `normfuse convert SOURCE --name {name} --repo {repo}` first"
        )
    return read_revision(model_dir)[0], model_dir


def specs(infos) -> list[TensorSpec]:
    """Manifest TensorInfo list -> TensorSpec list."""
    return [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in infos]


def open_variant(
    repo: str | Path, name: str, variant: str | None = None, *, benchmark: bool = False
) -> tuple[Manifest, Path, VariantInfo, dict[str, Path]]:
    """Pick a variant (None: the default), refuse a non-servable one unless `benchmark`, verify its sha256s;
    role -> path, for tools that hand paths on (engines.load reads each file once instead: `pick_variant`)."""
    manifest, model_dir, info = pick_variant(repo, name, variant, benchmark=benchmark)
    return manifest, model_dir, info, verify_files(model_dir, info)


def pick_variant(repo: str | Path, name: str, variant: str | None = None, *, benchmark: bool = False
                 ) -> tuple[Manifest, Path, VariantInfo]:
    manifest, model_dir, info, _ = pick_plan(repo, name, variant, benchmark=benchmark)
    return manifest, model_dir, info


def pick_plan(repo: str | Path, name: str, version: str | None = None, *, benchmark: bool = False
              ) -> tuple[Manifest, Path, VariantInfo, Plan | None]:
    """`pick_variant`, with the OpenVINO plan `version` names (None for a variant): its engine and precision, and
    the variant whose files it runs."""
    manifest, model_dir = open_model(repo, name)
    variant = version or manifest.default_variant
    plan = find_plan(manifest, variant)  # an OpenVINO plan runs its variant's files
    if plan is not None and not plan.servable and not benchmark:
        raise ManifestError(f"plan {variant!r} of {name!r} is not servable: {plan.reason}")
    info = manifest.variants.get(plan.variant if plan is not None else variant)
    if info is None:
        why = manifest.not_applicable.get(variant)
        raise ManifestError(
            f"model {name!r} has no variant {variant!r}"
            + (f" (not applicable: {why})" if why else "")
            + f"; variants: {', '.join(manifest.variants)}"
        )
    if not info.servable and not benchmark:
        reason = "it is benchmark-only" if info.benchmark_only else "it failed a parity gate"
        raise ManifestError(
            f"variant {variant!r} of {name!r} is not servable ({reason}); servable: "
            f"{', '.join(manifest.servable())}. Pass benchmark=True to open it for measurement only."
        )
    return manifest, model_dir, info, plan


def load(
    repo: str | Path,
    model: str,
    variant: str | None = None,
    backend: str = "onnxruntime",
    *,
    benchmark: bool = False,
    **options,
) -> Engine:
    """Open one variant of `model` from the repository on `backend` and load it from the bytes its manifest's
    sha256 vouches for (each file read once, inside the model's directory)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    manifest, model_dir, info, plan = pick_plan(repo, model, variant, benchmark=benchmark)
    files = artifacts(model_dir, info)
    if plan is not None:  # a plan names its engine and precision itself
        backend, options = plan.engine, {"precision": plan.precision, **options}
        files |= plan_artifacts(model_dir, plan)  # its own IR (int8), read like the variant's files
    module_name, function_name = BACKENDS[backend].split(":")
    try:
        opener = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"backend {backend!r} is not available here: {exc}") from exc
    try:
        engine = opener(model_dir, manifest, info, files, **options)
    except TypeError as exc:  # an option this backend does not take: say which backend, not just the signature
        raise EngineError(f"backend {backend!r} does not accept the options {sorted(options)}: {exc}") from exc
    engine.max_batch_size = engine.max_batch_size or manifest.max_batch_size
    engine.load()
    try:
        for artifact in files.values():  # the files this backend did not read are the manifest's too
            artifact.check()
    except ManifestError:
        engine.close()
        raise
    return engine


def _open_onnxruntime(model_dir: Path, manifest: Manifest, info: VariantInfo, files: dict[str, Artifact],
                      **options):
    from engines.onnxruntime import OnnxRuntimeEngine

    if "onnx" not in files:
        raise EngineError(f"variant {info.name!r} has no ONNX file in its manifest entry")
    return OnnxRuntimeEngine(files["onnx"], external_data=files.get("onnx_data"), **options)


def _open_torch(model_dir: Path, manifest: Manifest, info: VariantInfo, files: dict[str, Artifact], **options):
    from engines.torch import TorchEngine

    if "torch" not in files:
        raise EngineError(
            f"variant {info.name!r} has no torch artifact (model.pt); re-run `normfuse convert` without --no-torch"
        )
    return TorchEngine(files["torch"], inputs=specs(manifest.inputs), outputs=specs(manifest.outputs), **options)
