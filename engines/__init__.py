"""Engines: one small runner interface (load / infer / close) over ONNX Runtime, OpenVINO, TensorRT and PyTorch.

Heavy backends are imported lazily: `import engines` needs neither TensorRT nor CUDA.

    with engines.load("model_repository", "vit-digits") as engine:      # the manifest's default variant
        logits = engine.infer({"pixel_values": batch})["logits"]
"""

from __future__ import annotations

import importlib
from pathlib import Path

from engines.base import DATATYPES, Engine, EngineError, InputError, TensorSpec, check_inputs
from engines.manifest import Manifest, ManifestError, VariantInfo, read_manifest, verify_files
from engines.plans import find_plan, plan_file

__all__ = [
    "BACKENDS", "DATATYPES", "Engine", "EngineError", "InputError", "ManifestError", "TensorSpec",
    "check_inputs", "load", "open_model", "open_variant", "specs",
]

# backend -> "module:function"; the function is (model_dir, manifest, variant, paths, **options) -> Engine
# (not yet loaded). A backend module adds itself here by name; it is imported only when asked for.
BACKENDS: dict[str, str] = {
    "onnxruntime": "engines:_open_onnxruntime",
    "torch": "engines:_open_torch",
    "tensorrt": "engines.tensorrt:open_variant",
    "openvino": "engines.openvino:open_variant",
}


def open_model(repo: str | Path, name: str) -> tuple[Manifest, Path]:
    """Read REPO/NAME/manifest.json; return it with the model's directory."""
    model_dir = Path(repo) / name
    if not model_dir.is_dir():
        from engines.manifest import list_models

        known = list_models(Path(repo))
        raise ManifestError(
            f"no model {name!r} in repository {repo} (models there: {', '.join(known) or 'none'}); "
            f"run `normfuse convert SOURCE --name {name} --repo {repo}` first"
        )
    return read_manifest(model_dir), model_dir


def specs(infos) -> list[TensorSpec]:
    """Manifest TensorInfo list -> TensorSpec list."""
    return [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in infos]


def open_variant(
    repo: str | Path, name: str, variant: str | None = None, *, benchmark: bool = False
) -> tuple[Manifest, Path, VariantInfo, dict[str, Path]]:
    """Pick a variant (None: the default), refuse a non-servable one unless `benchmark`, verify its sha256s."""
    manifest, model_dir = open_model(repo, name)
    variant = variant or manifest.default_variant
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
    return manifest, model_dir, info, verify_files(model_dir, info)


def load(
    repo: str | Path,
    model: str,
    variant: str | None = None,
    backend: str = "onnxruntime",
    *,
    benchmark: bool = False,
    **options,
) -> Engine:
    """Open one variant of `model` from the repository on `backend`, sha256-verified, and load it."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    manifest, model_dir, info, paths = open_variant(repo, model, variant, benchmark=benchmark)
    if (plan := find_plan(manifest, variant)) is not None:  # a plan names its engine and precision itself
        backend, options = plan.engine, {"precision": plan.precision, "model_file": plan_file(model_dir, plan), **options}
    module_name, function_name = BACKENDS[backend].split(":")
    try:
        opener = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"backend {backend!r} is not available here: {exc}") from exc
    try:
        engine = opener(model_dir, manifest, info, paths, **options)
    except TypeError as exc:  # an option this backend does not take: say which backend, not just the signature
        raise EngineError(f"backend {backend!r} does not accept the options {sorted(options)}: {exc}") from exc
    engine.max_batch_size = engine.max_batch_size or manifest.max_batch_size
    return engine.load()


def _open_onnxruntime(model_dir: Path, manifest: Manifest, info: VariantInfo, paths: dict[str, Path], **options):
    from engines.onnxruntime import OnnxRuntimeEngine

    if "onnx" not in paths:
        raise EngineError(f"variant {info.name!r} has no ONNX file in its manifest entry")
    return OnnxRuntimeEngine(paths["onnx"], **options)


def _open_torch(model_dir: Path, manifest: Manifest, info: VariantInfo, paths: dict[str, Path], **options):
    from engines.torch import TorchEngine

    if "torch" not in paths:
        raise EngineError(
            f"variant {info.name!r} has no torch artifact (model.pt); re-run `normfuse convert` without --no-torch"
        )
    return TorchEngine(paths["torch"], inputs=specs(manifest.inputs), outputs=specs(manifest.outputs), **options)
