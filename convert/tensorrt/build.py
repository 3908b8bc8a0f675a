"""Build TensorRT engines from each variant's ONNX, on the GPU that will run them.

TensorRT is imported lazily, and only its builder-side API is used here (the runtime side is
engines/tensorrt.py). The flow follows tensorrt.md §1.2:

    Builder -> create_network(flags) -> OnnxParser.parse_from_file (external data!) -> builder config
    (workspace pool, optimization level, timing cache, one optimization profile) -> build_serialized_network.

Version switch (tensorrt.md §0.1, §1.4): on 11.x every network is strongly typed and there is no FP16
builder flag, so `--precision fp16` means parsing the FP16 precision-annotated ONNX (convert/tensorrt/precision.py);
on 10.x the same ONNX is parsed into a STRONGLY_TYPED network. `EXPLICIT_BATCH` is never referenced.
Plans are cached by engines.trt_cache (the plan-cache schema, which with engines.manifest is all of `engines`
that convert imports); a matching plan is reused, anything else is rebuilt.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from convert.tensorrt.parity import gate_plans, tensorrt_runner
from engines.manifest import (
    Manifest,
    PlanRef,
    TensorInfo,
    file_ref,
    sha256_file,
    verify_files,
    write_manifest,
)
from engines.trt_cache import (
    EngineKey,
    ShapeProfile,
    capturing_logger,
    files_digest,
    lookup,
    timing_cache_path,
    variant_source_sha256,
    write_sidecar,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


class TensorRTError(RuntimeError):
    """Building TensorRT engines failed or is impossible here; the message says why and what to do."""


class TensorRTUnavailable(TensorRTError):
    """TensorRT's builder or a CUDA GPU is missing here; the message says which and what to do."""


class OnnxParseError(TensorRTError):
    """TensorRT's ONNX parser refused the model; the message names each failing node and operator."""


class EngineBuildError(TensorRTError):
    """build_serialized_network failed; the message carries TensorRT's log."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 8, 32)        # profile: min, opt (the median), max
    other_dynamic: tuple[int, int, int] = (1, 128, 512)  # min/opt/max for non-batch dynamic axes (sequence)
    workspace_bytes: int = 1 << 30
    optimization_level: int = 3                      # TensorRT's default; 0 builds fastest, 5 searches most
    tf32: bool = True                                # TensorRT's default: FP32 matmuls may use TF32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization level must be 0..5, got {self.optimization_level}")


# -- the CLI's options (convert/cli.py adds these to `normfuse convert`) -----------------------------------
def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """ "1,8,32" -> (1, 8, 32); argparse.ArgumentTypeError for anything else."""
    import argparse

    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 1,8,32; got {text!r}")
    return sizes


def add_arguments(command) -> None:
    """`--precision` and `--batch-sizes` for `normfuse convert --backend tensorrt`."""
    command.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="TensorRT engine precision; fp16 builds from an FP16 ONNX with norms kept in FP32")
    command.add_argument("--batch-sizes", type=parse_batch_sizes, default=(1, 8, 32), metavar="N,N,...",
                        help="batch sizes the TensorRT profile covers: min, opt (median) and max (default 1,8,32)")


def check(args) -> None:
    """CLI hook, called before converting: fail fast when engines cannot be built here."""
    check_tensorrt_available()


def build(model_dir: Path, manifest: Manifest, args) -> list[Path]:
    """CLI hook (convert/cli.py BACKENDS), called after the ONNX files and manifest were written."""
    plans = build_engines(model_dir, manifest, precision=args.precision, batch_sizes=args.batch_sizes)
    for plan in plans:
        log.info("TensorRT plan: %s", plan)
    return plans


# -- what is installed ----------------------------------------------------------------------------
def load_tensorrt_builder():
    """The full `tensorrt` module (builder + parser); TensorRTUnavailable naming what is missing."""
    problems, trt = [], None
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when the CUDA/TensorRT libraries are missing
        problems.append(_missing_tensorrt(exc))
    if trt is not None and not all(hasattr(trt, name) for name in ("Builder", "OnnxParser")):
        problems.append(f"the installed `tensorrt` ({trt.__version__}) has no Builder/OnnxParser")
    if trt is not None and tensorrt_major(trt) < 10:
        problems.append(f"TensorRT {trt.__version__} is too old: 10.x or 11.x is required")
    cuda = _cuda_problem()
    if cuda:
        problems.append(cuda)
    if problems:
        raise TensorRTUnavailable(
            "--backend tensorrt needs TensorRT's builder and an NVIDIA GPU, and here " + "; ".join(problems)
            + ". On a GPU host use the NVIDIA TensorRT container or `pip install -e '.[gpu]'` "
            "(docs/gpu-tensorrt.md); on this machine use --backend onnxruntime."
        )
    return trt


def check_tensorrt_available() -> None:
    """Raise TensorRTUnavailable unless engines can be built here (full TensorRT >= 10 and a CUDA GPU)."""
    load_tensorrt_builder()


def _missing_tensorrt(exc: Exception) -> str:
    try:
        import tensorrt_lean
    except Exception:
        return f"the `tensorrt` Python module is not installed ({exc})"
    return (
        f"only the TensorRT lean runtime is installed (tensorrt_lean {tensorrt_lean.__version__}): it runs "
        "plans but has no builder or ONNX parser"
    )


def _cuda_problem() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return f"no CUDA GPU is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda})"


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "9.0") of the CUDA device plans are built for."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


# -- shapes ----------------------------------------------------------------------------------------
def profiles_for(inputs: list[TensorInfo], options: BuildOptions) -> dict[str, ShapeProfile]:
    """One ShapeProfile per input with a dynamic (-1) axis: axis 0 from the batch sizes, others from
    `options.other_dynamic`; static axes are fixed."""
    sizes = sorted(set(options.batch_sizes))
    batch = (sizes[0], int(statistics.median_low(sizes)), sizes[-1])
    profiles = {}
    for info in inputs:
        if -1 not in info.shape:
            continue
        rows = [
            (d, d, d) if d != -1 else (batch if axis == 0 else options.other_dynamic)
            for axis, d in enumerate(info.shape)
        ]
        profiles[info.name] = ShapeProfile(*(tuple(r[i] for r in rows) for i in range(3)))
    return profiles


def to_trt_profile(trt, builder, network, profiles: dict[str, ShapeProfile]):
    """The one place plain ShapeProfiles become a TensorRT optimization profile (checked against the network)."""
    dynamic = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if -1 in tuple(tensor.shape):
            dynamic[tensor.name] = tuple(tensor.shape)
    missing, unknown = sorted(set(dynamic) - set(profiles)), sorted(set(profiles) - set(dynamic))
    if missing or unknown:
        raise EngineBuildError(
            f"profiles do not match the network's dynamic inputs {dynamic}: "
            f"missing {missing}, not dynamic or unknown {unknown}"
        )
    profile = builder.create_optimization_profile()
    for name, shape in profiles.items():
        if len(shape.min) != len(dynamic[name]):
            raise EngineBuildError(f"profile for {name!r} has rank {len(shape.min)}, the network's is {dynamic[name]}")
        profile.set_shape(name, shape.min, shape.opt, shape.max)
    if not profile:  # TensorRT's partial validity check
        raise EngineBuildError(f"TensorRT rejected the optimization profile {profiles}")
    return profile


def network_flags(trt) -> int:
    """Strongly typed on both majors: 0 on 11.x (always strongly typed), the STRONGLY_TYPED bit on 10.x."""
    if tensorrt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


# -- one build ---------------------------------------------------------------------------------------
def parse_onnx(trt, network, logger, onnx_path: Path):
    """Parse from the file (so external data beside it is found); OnnxParseError names node and operator."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return parser
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        errors.append(
            f"node {error.node()} {error.node_name()!r} (operator {error.node_operator()}): "
            f"{error.desc()} [{error.code()}]"
        )
    raise OnnxParseError(f"TensorRT {trt.__version__} could not parse {onnx_path}:\n  " + "\n  ".join(errors))


def build_plan(trt, onnx_path: Path, profiles: dict[str, ShapeProfile], options: BuildOptions,
               timing_cache: Path) -> tuple[bytes, list[str]]:
    """Build one serialized plan; returns (plan bytes, TensorRT's WARNING+ log lines)."""
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = parse_onnx(trt, network, logger, onnx_path)  # noqa: F841 - the parser must outlive the build
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if config.add_optimization_profile(to_trt_profile(trt, builder, network, profiles)) < 0:
        raise EngineBuildError(f"add_optimization_profile failed:\n{logger.tail()}")
    log.info("building %s: TensorRT %s, %s, profiles %s, level %d", onnx_path.name, trt.__version__,
             options.precision, profiles, options.optimization_level)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"build_serialized_network returned None for {onnx_path}; TensorRT said:\n{logger.tail()}")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan), list(logger.lines)


def builder_flags(trt, options: BuildOptions) -> dict[str, str]:
    return {
        "builder_optimization_level": str(options.optimization_level),
        "workspace_bytes": str(options.workspace_bytes),
        "tf32": str(options.tf32).lower(),
        "strongly_typed": "true",
        "network_flags": str(network_flags(trt)),
        "hardware_compatibility_level": "NONE",
        "version_compatible": "false",
    }


# -- every variant ---------------------------------------------------------------------------------
def build_engines(
    model_dir: Path,
    manifest: Manifest,
    *,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    cache_dir: Path | None = None,
    options: BuildOptions | None = None,
) -> list[Path]:
    """Build (or reuse) one plan per variant; plans go to `cache_dir/<variant>/` (default
    `model_dir/<variant>/tensorrt/`). Every plan then passes the parity gate against the unfused ONNX
    Runtime reference (convert/tensorrt/parity.py, recorded in the manifest); returns the plans that passed,
    in manifest order."""
    from convert.tensorrt import int8 as trt_int8

    options = options or BuildOptions(precision=precision, batch_sizes=tuple(batch_sizes))
    trt = load_tensorrt_builder()  # fails fast, before any file is touched
    gpu_name, capability = gpu_identity()
    model_dir = Path(model_dir)
    profiles = profiles_for(manifest.inputs, options)
    plans: dict[str, Path] = {}
    keys: dict[str, EngineKey] = {}
    for name, variant in manifest.variants.items():
        if not trt_int8.should_build(variant):
            log.info("variant %s: no plan (it failed its accuracy gate at conversion)", name)
            continue
        files = verify_files(model_dir, variant)
        out_dir = Path(cache_dir) / name if cache_dir else model_dir / name / "tensorrt"
        out_dir.mkdir(parents=True, exist_ok=True)
        precision = trt_int8.plan_precision(variant, options.precision)  # a QDQ ONNX: explicit INT8, as it is
        onnx_path = files["onnx"] if precision in ("fp32", "int8") else _fp16_onnx(files["onnx"], out_dir)
        key = EngineKey(
            source_sha256=variant_source_sha256(variant.files),
            onnx_sha256=variant_source_sha256(variant.files) if onnx_path == files["onnx"] else _onnx_digest(onnx_path),
            trt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=capability,
            precision=precision,
            profiles=profiles,
            builder_flags=builder_flags(trt, options),
        )
        found = lookup(out_dir, name, key)
        if found:
            log.info("variant %s: reusing %s", name, found.plan.name)
        else:
            log.info("variant %s: building (%s)", name, found.reason)
            timing = timing_cache_path(Path(cache_dir) if cache_dir else model_dir, key.trt_version, capability)
            plan, lines = build_plan(trt, onnx_path, profiles, options, timing)
            found.plan.write_bytes(plan)
            write_sidecar(found.plan, name, key, build_log=lines)
        plans[name], keys[name] = found.plan, key
    run_plan = tensorrt_runner(trt)
    exact = {n: p for n, p in plans.items() if not trt_int8.is_lossy(manifest.variants[n])}
    passed = gate_plans(model_dir, manifest, exact, precision=options.precision, tf32=options.tf32, run_plan=run_plan)
    passed |= trt_int8.gate_plans(model_dir, manifest, {n: p for n, p in plans.items() if n not in exact}, run_plan)
    failed = [name for name, ok in passed.items() if not ok]
    if failed:
        log.warning("TensorRT plans of %s failed their parity/accuracy gate and were removed (see manifest.json)",
                    ", ".join(failed))
    kept = {name: plan for name, plan in plans.items() if passed[name]}
    for name in plans.keys() - kept.keys():  # a removed plan: nothing may point at it
        removed = Path(plans[name]).name
        manifest.variants[name].tensorrt_plans = [p for p in manifest.variants[name].tensorrt_plans if Path(p.path).name != removed]
    record_plans(model_dir, manifest, kept, keys)
    return list(kept.values())


def record_plans(model_dir: Path, manifest: Manifest, plans: dict[str, Path], keys: dict[str, EngineKey]) -> None:
    """List each gated plan in its variant's manifest entry (sha256, size, build key, whether its host code may
    run): the server opens only plans recorded there (engines.tensorrt.recorded_plan). A rebuild of the same
    path replaces its record; plans outside the model's directory (a separate cache_dir) are not recorded."""
    for name, plan in plans.items():
        if not Path(plan).resolve().is_relative_to(Path(model_dir).resolve()):
            log.warning("plan %s is outside %s: not recorded in the manifest, so not served", plan, model_dir)
            continue
        ref = file_ref(model_dir, plan)
        record = PlanRef(**ref.model_dump(), key=keys[name].to_json(),
                         host_code_allowed=keys[name].builder_flags.get("version_compatible") == "true")
        info = manifest.variants[name]
        info.tensorrt_plans = [p for p in info.tensorrt_plans if p.path != record.path] + [record]
    write_manifest(Path(model_dir), manifest)


def _fp16_onnx(fp32_onnx: Path, out_dir: Path) -> Path:
    """The FP16 precision-annotated ONNX, written next to the plans (a build artifact, like them)."""
    from convert.tensorrt.precision import write_fp16_onnx

    path = out_dir / "model.fp16.onnx"
    result = write_fp16_onnx(fp32_onnx, path)
    log.info("FP16 ONNX %s: %d nodes kept in FP32", path, len(result.kept_fp32))
    return path


def _onnx_digest(onnx_path: Path) -> str:
    data = Path(f"{onnx_path}.data")
    shas = [sha256_file(onnx_path)] + ([sha256_file(data)] if data.is_file() else [])
    return files_digest(shas)
