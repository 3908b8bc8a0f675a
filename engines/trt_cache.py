"""The TensorRT engine cache schema: which plan file belongs to which (ONNX, TensorRT, GPU, precision, profile).

An on-disk artifact schema like manifest.json, and with engines/manifest.py the only engines module that
`convert` imports: the builder (convert/tensorrt/build.py) writes plans and sidecars, the runtime
(engines/tensorrt.py) finds and reads them. So it stays pure Python with no runtime logic: keys, file names,
sidecar read/write and lookup, plus `capturing_logger`, the one TensorRT log sink both sides hand to
TensorRT, which takes the `trt` module as an argument and imports nothing.

A plan is only valid for the exact TensorRT version, GPU model and compute capability it was built on
(tensorrt.md §3), so every plan is stored as ``<stem>.plan`` next to a sidecar ``<stem>.json`` holding its
full `EngineKey`. The stem is readable and ends in a hash of the key, so two keys never share a file and a
lookup is a file-name check plus a key comparison.

Plans and timing caches are build artifacts of one (GPU, TensorRT) pair: never commit them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engines.base import EngineError

log = logging.getLogger(__name__)

KEY_VERSION = 1


class EngineCacheError(EngineError):
    """No usable plan is cached and none can be built here; the message says what differs."""


@dataclass(frozen=True)
class ShapeProfile:
    """An optimization-profile range for one input: TensorRT tunes for `opt` and accepts [min, max]."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"profile ranks differ: min {self.min}, opt {self.opt}, max {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 1 <= lo <= mid <= hi:
                raise ValueError(f"profile must satisfy 1 <= min <= opt <= max per axis: {self.min} {self.opt} {self.max}")

    def as_lists(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. Two builds with equal keys are interchangeable."""

    source_sha256: str          # the variant's contract ONNX (the manifest's "onnx" file, plus external data)
    onnx_sha256: str            # the ONNX actually parsed (the FP16-annotated one for precision fp16)
    trt_version: str            # trt.__version__, e.g. "11.4.0.106"
    gpu_name: str               # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str     # "9.0"
    precision: str              # "fp32" | "fp16" | "int8" (a lossy variant's QDQ ONNX, explicitly quantized)
    profiles: dict[str, ShapeProfile]
    builder_flags: dict[str, str] = field(default_factory=dict)  # optimization level, workspace, TF32, typing…
    key_version: int = KEY_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["profiles"] = {name: p.as_lists() for name, p in sorted(self.profiles.items())}
        data["builder_flags"] = dict(sorted(self.builder_flags.items()))
        return data

    @classmethod
    def from_json(cls, data: dict) -> EngineKey:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown engine-key field(s) {unknown}")
        profiles = {
            name: ShapeProfile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
            for name, p in data.get("profiles", {}).items()
        }
        return cls(**{**data, "profiles": profiles})

    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def stem(self, variant: str) -> str:
        """A stable, readable file stem: ``<variant>.<precision>.trt<version>.sm<cc>.<hash12>``."""
        sm = self.compute_capability.replace(".", "")
        return _safe(f"{variant}.{self.precision}.trt{self.trt_version}.sm{sm}.{self.digest()[:12]}")

    def differences(self, other: EngineKey) -> list[str]:
        """Human-readable field differences, e.g. "trt_version: 11.3.0.99 (cached) != 11.4.0.106 (wanted)"."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{name}: {mine[name]} (cached) != {theirs[name]} (wanted)"
            for name in mine
            if mine[name] != theirs[name]
        ]


def files_digest(sha256s: list[str]) -> str:
    """One digest for an ONNX model stored as several files (graph + external data), order-sensitive."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()


def variant_source_sha256(files: dict) -> str:
    """`files_digest` of a manifest variant's ONNX files (role "onnx", then "onnx_data" when present).

    `files` is `VariantInfo.files` (role -> FileRef); the server computes this without reading the ONNX.
    """
    roles = ["onnx"] + (["onnx_data"] if "onnx_data" in files else [])
    return files_digest([files[role].sha256 for role in roles])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plan_path(cache_dir: Path, variant: str, key: EngineKey) -> Path:
    return Path(cache_dir) / f"{key.stem(variant)}.plan"


def sidecar_path(plan: Path) -> Path:
    return Path(plan).with_suffix(".json")


def timing_cache_path(cache_dir: Path, trt_version: str, compute_capability: str) -> Path:
    """Timing caches are shared by every variant built with one TensorRT version on one GPU architecture."""
    sm = compute_capability.replace(".", "")
    return Path(cache_dir) / _safe(f"trt{trt_version}.sm{sm}.timing_cache")  # *.timing_cache is git-ignored


def write_sidecar(plan: Path, variant: str, key: EngineKey, *, build_log: list[str] | None = None) -> Path:
    path = sidecar_path(plan)
    data = {"variant": variant, "plan": Path(plan).name, "key": key.to_json(), "build_log": build_log or []}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_sidecar(plan: Path) -> tuple[str, EngineKey]:
    """(variant, key) recorded next to `plan`; EngineCacheError when missing or unreadable."""
    path = sidecar_path(plan)
    try:
        data = json.loads(path.read_text())
        return data["variant"], EngineKey.from_json(data["key"])
    except FileNotFoundError:
        raise EngineCacheError(f"plan {plan} has no sidecar {path.name}: rebuild it") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineCacheError(f"sidecar {path} is not a valid engine key ({exc}): rebuild the plan") from exc


@dataclass(frozen=True)
class Lookup:
    """The outcome of `lookup`: a usable plan (`hit`), or why it must be built."""

    plan: Path
    hit: bool
    reason: str

    def __bool__(self) -> bool:
        return self.hit


def lookup(cache_dir: Path, variant: str, key: EngineKey) -> Lookup:
    """Find the plan for `key`. A miss names the closest cached plan and what differs from it."""
    plan = plan_path(cache_dir, variant, key)
    if plan.is_file():
        try:
            _, cached = read_sidecar(plan)
        except EngineCacheError as exc:
            return Lookup(plan, False, str(exc))
        if cached == key:
            return Lookup(plan, True, "cached plan matches")
        return Lookup(plan, False, "sidecar disagrees with the file name: " + "; ".join(cached.differences(key)))
    nearest = _nearest(cache_dir, variant, key)
    if nearest is None:
        return Lookup(plan, False, f"no cached plan for variant {variant!r} in {cache_dir}")
    other, diffs = nearest
    return Lookup(plan, False, f"cached plan {other.name} was built for another setup: " + "; ".join(diffs))


def _nearest(cache_dir: Path, variant: str, key: EngineKey) -> tuple[Path, list[str]] | None:
    best: tuple[Path, list[str]] | None = None
    for plan in sorted(Path(cache_dir).glob("*.plan")):
        try:
            cached_variant, cached = read_sidecar(plan)
        except EngineCacheError:
            continue
        if cached_variant != variant:
            continue
        diffs = cached.differences(key)
        if best is None or len(diffs) < len(best[1]):
            best = (plan, diffs)
    return best


def require(cache_dir: Path, variant: str, key: EngineKey, *, can_build: bool, why_not: str = "") -> Lookup:
    """`lookup`, but a miss where building is impossible raises EngineCacheError with the reason and the fix."""
    found = lookup(cache_dir, variant, key)
    if found or can_build:
        return found
    raise EngineCacheError(
        f"no usable TensorRT plan for variant {variant!r} ({found.reason}) and none can be built here"
        f"{': ' + why_not if why_not else ''}. Build it on this GPU with "
        "`normfuse convert ... --backend tensorrt` (see docs/gpu-tensorrt.md)."
    )


def select_plan(
    cache_dir: Path,
    variant: str,
    *,
    source_sha256: str,
    precision: str | None,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
) -> Path:
    """The serving-side lookup: a plan built from this ONNX, at this precision, for this TensorRT and GPU.

    `precision=None` accepts any precision; among several matching plans the most recently built one wins.
    The server cannot build, so a miss raises EngineCacheError listing every candidate and why it was refused.
    """
    wanted = {
        "source_sha256": source_sha256,
        "precision": precision,
        "trt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
    }
    if precision is None:
        del wanted["precision"]
    refused, matches = [], []
    for plan in sorted(Path(cache_dir).glob("*.plan")):
        try:
            cached_variant, key = read_sidecar(plan)
        except EngineCacheError as exc:
            refused.append(f"{plan.name}: {exc}")
            continue
        diffs = _mismatches(cached_variant, key, variant, wanted)
        if not diffs:
            matches.append(plan)
        else:
            refused.append(f"{plan.name}: {', '.join(diffs)}")
    if matches:
        return max(matches, key=lambda plan: (plan.stat().st_mtime_ns, plan.name))
    raise _no_plan(cache_dir, variant, precision, gpu_name, compute_capability, trt_version, refused)


def select_recorded(records: list, variant: str, *, source_sha256: str, precision: str | None, trt_version: str,
                    gpu_name: str, compute_capability: str):
    """`select_plan` over the plans a manifest records (`engines.manifest.PlanRef`: path + key), which is what
    the server opens: a plan the manifest does not list, or a sidecar, chooses nothing. The last match wins
    (the most recently recorded build)."""
    wanted = {"source_sha256": source_sha256, "precision": precision, "trt_version": trt_version,
              "gpu_name": gpu_name, "compute_capability": compute_capability}
    if precision is None:
        del wanted["precision"]
    refused, matches = [], []
    for record in records:
        try:
            key = EngineKey.from_json(record.key)
        except (ValueError, KeyError, TypeError) as exc:
            refused.append(f"{record.path}: its recorded key is not valid ({exc})")
            continue
        diffs = _mismatches(variant, key, variant, wanted)
        if diffs:
            refused.append(f"{record.path}: {', '.join(diffs)}")
        else:
            matches.append(record)
    if matches:
        return matches[-1]
    if not records:
        refused.append("the manifest records none (plans are recorded by `normfuse convert --backend tensorrt` "
                       "since plans are hashed; a plan only on disk is not opened)")
    raise _no_plan("the manifest", variant, precision, gpu_name, compute_capability, trt_version, refused)


def _mismatches(cached_variant: str, key: EngineKey, variant: str, wanted: dict) -> list[str]:
    got = {name: getattr(key, name) for name in wanted}
    diffs = [f"{n} {got[n]!r} != {wanted[n]!r}" for n in wanted if got[n] != wanted[n]]
    return ([f"variant {cached_variant!r} != {variant!r}"] if cached_variant != variant else []) + diffs


def _no_plan(where, variant, precision, gpu_name, compute_capability, trt_version, refused) -> EngineCacheError:
    detail = "; ".join(refused) if refused else "no plans at all"
    return EngineCacheError(
        f"no TensorRT plan in {where} for variant {variant!r} at {precision or 'any precision'} on {gpu_name} "
        f"(sm {compute_capability}) with TensorRT {trt_version} [{detail}]. Plans are built per GPU and "
        "TensorRT version: run `normfuse convert ... --backend tensorrt` on this host."
    )


def capturing_logger(trt, min_severity=None):
    """A `trt.ILogger` that forwards to Python logging and keeps WARNING-and-worse lines in `.lines`.

    TensorRT reports build and deserialization failures only through its logger (tensorrt.md §1.2), so the
    captured lines go into every error raised after a call that returned None or False.
    """
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.INFO,
        severity.VERBOSE: logging.DEBUG,
    }
    keep = {severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING}

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: collections.deque[str] = collections.deque(maxlen=200)  # long-lived runtimes log on
            if min_severity is not None:
                self.min_severity = min_severity

        def log(self, sev, msg) -> None:
            level = levels.get(sev, logging.INFO)
            log.log(level, "tensorrt: %s", msg)
            if sev in keep:
                self.lines.append(f"[{getattr(sev, 'name', sev)}] {msg}")

        def tail(self, n: int = 20) -> str:
            return "\n".join(list(self.lines)[-n:]) or "(TensorRT logged nothing at WARNING or above)"

    return CapturingLogger()
