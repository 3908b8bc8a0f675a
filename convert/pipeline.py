"""The conversion pipeline: SOURCE -> rewritten variants -> verified ONNX (+ torch.export) files -> manifest.

    stage     make_staging       a temporary directory inside the repository           (convert.staging)
    load      load_source        the source model and its held-out data                (convert.models, .context)
    build     build_variant      per variant: rewrite (NotApplicable -> reason) -> verify in torch -> export ONNX
                                 -> ONNX Runtime parity against the ORIGINAL model -> op census (convert.variant)
    pick      benchmark          unfused vs each variant, interleaved; the default only when its speed-up's
                                 95% bound excludes 1                                   (convert.default_pick)
    write     write_manifest     manifest.json + the parity inputs later backends gate on
    land      move_into_place    swapped with the model directory in one step          (convert.staging)

Between rewrites the source's weights wait in a file (convert.memory). A failed conversion never leaves a
half-written model behind: everything is written into the staging directory and removed on the way out.
"""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from convert.constraints import input_constraints
from convert.context import Context
from convert.default_pick import benchmark
from convert.lossy import LOSSY_VARIANTS
from convert.memory import release_memory
from convert.models import Source, load_source
from convert.plans import PlanOptions, attach_plans
from convert.quantize import Int8Options
from convert.rewrites import BENCHMARK_ONLY, EXACT_VARIANTS
from convert.staging import make_staging, move_into_place
from convert.tensorrt.parity import save_parity_inputs
from convert.variant import build_variant, flag_lost_fusions, unfused_failure
from engines.manifest import Manifest, VariantInfo, write_manifest

log = logging.getLogger(__name__)


class ConversionError(RuntimeError):
    """The conversion could not produce a servable model (the message says why)."""


@dataclass
class ConvertOptions:
    variants: list[str] | None = None   # None: unfused + every exact variant that applies
    include_bound: bool = False         # also build the benchmark-only `nonorm` bound
    samples: int = 32                   # held-out samples for parity
    benchmark: bool = True              # time variants at conversion to pick default_variant
    benchmark_rounds: int = 8           # A B A B ... rounds per variant pair (8: one lost round still bounds the median)
    benchmark_batch: int = 8
    torch_artifacts: bool = True        # also save model.pt per variant (TorchEngine)
    threads: int | None = None          # ORT intra-op threads (None: all cores)
    progress: bool = True
    max_batch_size: int = 32
    tools: dict[str, str] = field(default_factory=dict)
    int8: Int8Options | None = None     # calibration + accuracy gate of the lossy variants (None: defaults)
    allow_lossy_default: bool = False   # a gated lossy variant (int8) may become default_variant
    plans: PlanOptions | None = None    # CPU plans (OpenVINO fp32/bf16/f16, gated and timed; None: variants only)


def convert(source: str | Source, name: str, repo: str | Path, options: ConvertOptions | None = None) -> Manifest:
    """Convert SOURCE into REPO/NAME (manifest.json + one directory per variant); return the manifest."""
    options = options or ConvertOptions()
    names = requested_variants(options)
    repo = Path(repo)
    staging = make_staging(repo, name)  # fails early (before any training) on an unwritable repository
    try:
        src = source if isinstance(source, Source) else load_source(source, progress=options.progress)
        context = Context(src, staging, options.samples, options.threads, options.torch_artifacts, options.int8)
        try:
            built, not_applicable = build_variants(context, names, progress=options.progress)
            default = pick_default(context, built, options)
        finally:
            context.weights.close()  # the caller's Source gets its model's weights back
        manifest = Manifest(
            name=name, source=str(source if not isinstance(source, Source) else source.name), task=src.task,
            tools=tool_versions() | options.tools, inputs=src.inputs, outputs=src.outputs,
            max_batch_size=options.max_batch_size, variants=built, not_applicable=not_applicable,
            default_variant=default, constraints=input_constraints(src),
            allow_lossy_default=options.allow_lossy_default,
        )
        if options.plans is not None:  # variant x engine x precision, gated and timed on this CPU (convert.plans)
            manifest = attach_plans(staging, manifest, src, options.plans)
        save_parity_inputs(staging, context.held_out)  # the batch later backends' parity gates run on
        write_manifest(staging, manifest)
        move_into_place(staging, repo / name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def requested_variants(options: ConvertOptions) -> list[str]:
    names = list(options.variants) if options.variants else ["unfused", *EXACT_VARIANTS]
    if options.include_bound:
        names += [v for v in BENCHMARK_ONLY if v not in names]
    if "unfused" in names:
        names.remove("unfused")
    known = (*EXACT_VARIANTS, *BENCHMARK_ONLY, *LOSSY_VARIANTS)
    unknown = [v for v in names if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of unfused, {', '.join(known)}")
    return ["unfused", *names]  # unfused is always built: it is the reference and the fallback default


def build_variants(context: Context, names: list[str], *,
                   progress: bool) -> tuple[dict[str, VariantInfo], dict[str, str]]:
    """Every variant that can be built, and the reason for each that cannot; ConversionError when unfused fails."""
    built, not_applicable = {}, {}
    bar = tqdm(names, desc="rewrite/verify/export", unit="variant", disable=not progress)
    for variant in bar:
        bar.set_postfix_str(variant)
        info = build_variant(context, variant, not_applicable)
        release_memory()  # a variant's model copy, export buffers and session are gone: give the pages back
        if info is not None:
            built[variant] = info
    if "unfused" not in built or not built["unfused"].servable:
        raise ConversionError(unfused_failure(built.get("unfused"), not_applicable.get("unfused")))
    flag_lost_fusions(built)
    return built, not_applicable


def pick_default(context: Context, built: dict[str, VariantInfo], options: ConvertOptions) -> str:
    """The default variant: unfused, unless the benchmark finds another one faster beyond noise."""
    if not options.benchmark or len(built) < 2:
        return "unfused"
    # while the source's weights are still parked: only the benchmark's sessions are resident
    context.reference = None
    release_memory()
    return benchmark(context, built, options.benchmark_rounds, options.benchmark_batch,
                     progress=options.progress, allow_lossy=options.allow_lossy_default)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("normfuse", "torch", "onnx", "onnxruntime", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
