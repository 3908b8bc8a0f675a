"""The model repository's manifest: the one schema `convert` writes and `engines`/`service` read.

Layout of a repository::

    REPO/NAME/manifest.json
    REPO/NAME/<variant>/model.onnx           (+ model.onnx.data when weights are external)
    REPO/NAME/<variant>/tensorrt/<key>.plan  (built on the target GPU, never committed)

Every file a variant uses is listed with its sha256; `read_manifest` + `verify_files` refuse a mismatch.
The only modules convert shares with engines are manifest.py and trt_cache.py, the artifact schemas.

A manifest is trusted for nothing (what the server opens, `read_revision` and `artifacts`): its `name` must be
its directory's; every file path is relative, without `..`, and resolves (symlinks followed) to a regular file
inside the model's directory; and what an engine deserializes is the bytes that were hashed (`Artifact.read`:
open once, read, hash, hand over those bytes), never a second read by path. TensorRT plans are listed in the
manifest too (`VariantInfo.tensorrt_plans`), with the build key they were made for and whether their host code may run.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.fileref import FileRef
from engines.plans import PlanSet

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable, or does not match the files beside it."""


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str = Field(description="Open Inference Protocol datatype, e.g. FP32")
    shape: list[int] = Field(description="-1 marks a dynamic axis; axis 0 is the batch")


class InputConstraint(BaseModel):
    """What the source model accepts in one input beyond its datatype and shape (convert.constraints records it,
    the server checks it before queueing). Values and axis sizes are inclusive limits; None/empty = no limit."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the input it applies to")
    min_value: float | None = Field(None, description="e.g. 0 for token ids")
    max_value: float | None = Field(None, description="e.g. vocab_size - 1 for token ids")
    axis_min: dict[int, int] = Field(default_factory=dict, description="axis -> smallest size, e.g. {1: 1}")
    axis_max: dict[int, int] = Field(default_factory=dict, description="axis -> largest size, e.g. {1: 1024}")
    same_shape_as: str | None = Field(None, description="another input whose shape this one must have")
    source: str = Field("", description="where the limits come from, e.g. 'config.vocab_size = 50257'")


class PlanRef(FileRef):
    """A TensorRT plan of a variant, recorded by `normfuse convert --backend tensorrt` after it passed its gate."""

    key: dict[str, Any] = Field(description="the engines.trt_cache.EngineKey it was built for (what its sidecar "
                                            "says; the server trusts this copy, never the sidecar)")
    host_code_allowed: bool = Field(False, description="a version-compatible plan: its embedded lean runtime "
                                                       "(host code) may run")


class Parity(BaseModel):
    """A verify result (convert.verify.Comparison) as recorded in the manifest."""

    # a failed comparison may carry inf/NaN errors: write them as JSON constants so they read back
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    passed: bool
    reference: str = Field(description="what the variant was compared against, e.g. 'torch unfused fp32'")
    candidate: str = Field(description="what was compared, e.g. 'onnxruntime cpu fp32'")
    dtype: str
    samples: int
    max_abs: float
    rel_l2: float
    cosine: float
    argmax_agreement: float | None = None
    gate: dict[str, float] = Field(description="the tolerances the comparison had to meet")
    needed: dict[str, float] = Field(description="the tolerances this comparison actually needed")


class Accuracy(BaseModel):
    """A lossy variant's accuracy record against `unfused` on held-out data, and the gate it had to pass."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    passed: bool = Field(description="met every threshold of `gate`; only then is the variant served")
    reference: str = Field(description="what it was compared against, e.g. 'onnxruntime cpu unfused fp32'")
    samples: int = Field(description="held-out inputs (disjoint from the calibration inputs)")
    rel_l2: float
    cosine: float
    top1_agreement: float | None = Field(None, description="share of positions whose argmax equals unfused's")
    task: dict[str, float] = Field(default_factory=dict,
                                   description="task metric where the source has labels, e.g. test_accuracy and "
                                               "unfused_test_accuracy")
    gate: dict[str, float] = Field(description="thresholds, e.g. {'min_top1_agreement': 0.99, 'min_cosine': 0.999}")
    failed: list[str] = Field(default_factory=list, description="which thresholds were missed, with the figures")
    calibration: dict[str, Any] = Field(default_factory=dict, description="what the ranges were calibrated on")
    quantization: dict[str, Any] = Field(default_factory=dict, description="tool, format, what stayed in float")
    smoothing: dict[str, Any] | None = Field(None, description="the reparameterization: norms smoothed, and the "
                                                               "norms left alone with the reason")

    def judge(self, figures: dict) -> list[str]:
        """The thresholds of this record's gate that `figures` miss (see `judge`)."""
        return judge(figures, self.gate)


def judge(figures: dict, gate: dict[str, float]) -> list[str]:
    """The thresholds of `gate` ({'min_top1_agreement', 'min_cosine'}) that `figures` (`accuracy_figures`) miss,
    each with its figure; [] = passed. An undefined agreement (one class, embeddings) is not judged."""
    failed = []
    agreement, least = figures.get("top1_agreement"), gate.get("min_top1_agreement")
    if agreement is not None and least is not None and not agreement >= least:
        failed.append(f"top-1 agreement {agreement:.4f} < {least}")
    if "min_cosine" in gate and not figures["cosine"] >= gate["min_cosine"]:
        failed.append(f"cosine {figures['cosine']:.6f} < {gate['min_cosine']}")
    return failed


def accuracy_figures(reference: list, candidate: list) -> dict[str, float | None]:
    """rel-L2 and cosine over all outputs, top-1 (last-axis argmax) agreement of the first output (None for
    one class): what an Accuracy record holds and its gate judges, wherever a lossy artifact is run."""
    import numpy as np

    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    c = np.concatenate([np.asarray(a, np.float64).ravel() for a in candidate])
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        return {"rel_l2": float("inf"), "cosine": -1.0, "top1_agreement": 0.0}
    norm_r, norm_c = np.linalg.norm(r), np.linalg.norm(c)
    cosine = float(np.dot(r, c) / (norm_r * norm_c)) if norm_r > 0 and norm_c > 0 else float(norm_r == norm_c)
    first_r, first_c = np.asarray(reference[0]), np.asarray(candidate[0])
    agreement = (float((np.argmax(first_r, -1) == np.argmax(first_c, -1)).mean())
                 if first_r.ndim >= 1 and first_r.shape[-1] >= 2 and first_r.size else None)
    return {"rel_l2": float(np.linalg.norm(r - c) / norm_r) if norm_r > 0 else float(np.linalg.norm(c) > 0),
            "cosine": cosine, "top1_agreement": agreement}


def save_reference(path: Path, inputs: dict, outputs: list) -> Path:
    """A lossy variant's `reference` file: held-out inputs (`in.<name>`) and unfused's outputs (`out.<i>`), so a
    plan built later (TensorRT, on the GPU) is judged on the same data as the ONNX was."""
    import numpy as np

    arrays = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{i}": v for i, v in enumerate(outputs)}
    np.savez_compressed(path, **arrays)
    return Path(path)


def load_reference(path: Path) -> tuple[dict, list]:
    import numpy as np

    with np.load(path) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        outputs = [data[f"out.{i}"] for i in range(sum(k.startswith("out.") for k in data.files))]
    return inputs, outputs


class VariantInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    exact: bool = Field(True, description="computes the same function as unfused (up to rounding)")
    servable: bool = Field(description="passed every parity gate; only servable variants are served")
    benchmark_only: bool = Field(False, description="e.g. the no-norm bound: built to measure, never served")
    files: dict[str, FileRef] = Field(description="role -> file, e.g. 'onnx', 'onnx_data'")
    tensorrt_plans: list[PlanRef] = Field(default_factory=list, description="TensorRT plans built for it (older "
                                 "manifests have none: the tensorrt backend then asks for a rebuild)")
    exporter: str = Field("", description="how model.onnx was exported, e.g. 'torchscript exporter, opset 17' "
                                          "(+ the experts implementation used for a fused MoE)")
    parity: list[Parity] = Field(default_factory=list)
    op_census: dict[str, int] = Field(default_factory=dict, description="ops after ORT graph optimization")
    flags: list[str] = Field(default_factory=list, description="warnings, e.g. 'lost-fusion:SkipLayerNormalization'")
    latency_ms: dict[str, float] = Field(default_factory=dict, description="conversion-time benchmark medians")
    accuracy: Accuracy | None = Field(None, description="lossy variants (exact: false): the record its gate judged")

    @model_validator(mode="after")
    def _servable_needs_parity(self) -> VariantInfo:
        if self.servable and (self.benchmark_only or not all(p.passed for p in self.parity)):
            raise ValueError(f"variant {self.name!r}: servable requires every parity check to pass")
        if self.servable and not self.exact and not (self.accuracy and self.accuracy.passed):
            raise ValueError(f"variant {self.name!r}: a lossy variant is servable only with a passed accuracy gate")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    source: str
    task: str = Field("", description="e.g. 'image-classification', 'causal-lm'")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    tools: dict[str, str] = Field(default_factory=dict, description="package -> version used to convert")
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int = 32
    variants: dict[str, VariantInfo]
    not_applicable: dict[str, str] = Field(default_factory=dict, description="variant -> why it was refused")
    default_variant: str
    constraints: list[InputConstraint] = Field(default_factory=list, description="value and size limits per input")
    allow_lossy_default: bool = Field(False, description="converted with --allow-lossy-default: a gated lossy "
                                                         "variant may be the default")
    plans: PlanSet | None = Field(None, description="variant x engine x precision plans, the CPU they were timed "
                                                    "on and the default plan (engines.plans); absent: variants only")

    @model_validator(mode="after")
    def _default_is_servable(self) -> Manifest:
        default = self.variants.get(self.default_variant)
        if default is None or not default.servable:
            raise ValueError(f"default_variant {self.default_variant!r} must name a servable variant")
        if not default.exact and not self.allow_lossy_default:
            raise ValueError(f"default_variant {self.default_variant!r} is lossy (exact: false); it can be the "
                             "default only when converted with --allow-lossy-default")
        return self

    def servable(self) -> list[str]:
        return [name for name, v in self.variants.items() if v.servable]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_ref(model_dir: Path, path: Path) -> FileRef:
    """Describe `path` (inside `model_dir`) with its sha256 and size."""
    path = Path(path)
    return FileRef(path=path.relative_to(model_dir).as_posix(), sha256=sha256_file(path), bytes=path.stat().st_size)


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(model_dir: Path) -> Manifest:
    """The manifest in `model_dir`, wherever it is (convert's staging copies included); what is served goes
    through `read_revision`, which also holds it to its directory."""
    return read_revision(model_dir, served=False)[0]


def manifest_sha256(model_dir: Path) -> str | None:
    """The sha256 of REPO/NAME/manifest.json's bytes, None if it cannot be read (e.g. mid-rename)."""
    try:
        return hashlib.sha256(_inside(Path(model_dir), MANIFEST_NAME, "the manifest").read_bytes()).hexdigest()
    except (OSError, ManifestError):  # a manifest.json outside its directory (a link) is never read
        return None


def read_revision(model_dir: Path, *, served: bool = True) -> tuple[Manifest, str]:
    """The manifest and the sha256 of its bytes (read once): what identifies one conversion of a model.
    `served` (what the server and engines.load read): the manifest is a regular file inside the directory and
    its `name` is the directory's; `read_manifest` (convert's staging copies, `.NAME.partial-*`) skips that."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = _inside(Path(model_dir), MANIFEST_NAME, "the manifest").read_bytes() if served else path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST_NAME} in {model_dir}: run `normfuse convert` first") from None
    try:
        manifest = Manifest.model_validate_json(data)
    except ValueError as exc:
        raise ManifestError(f"{path} is not a valid normfuse manifest: {exc}") from exc
    if served and manifest.name != Path(model_dir).name:
        raise ManifestError(f"{path} names the model {manifest.name!r}, but its directory is "
                            f"{Path(model_dir).name!r}: a manifest serves only its own directory (re-run "
                            f"`normfuse convert ... --name {Path(model_dir).name}`)")
    return manifest, hashlib.sha256(data).hexdigest()


def check_model_name(name: str) -> str:
    """A model name is one visible directory of the repository: no separators, not '.', '..' or hidden."""
    if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise ManifestError(f"{name!r} is not a model name: one directory of the repository, without '/', "
                            "'\\' or a leading '.'")
    return name


def _inside(model_dir: Path, relative: str, what: str) -> Path:
    """`model_dir/relative` resolved (symlinks followed): ManifestError unless it is a regular file inside the
    model's (resolved) directory. FileNotFoundError when it does not exist."""
    base = Path(model_dir).resolve(strict=True)
    target = (base / relative).resolve(strict=True)
    if not target.is_relative_to(base):
        raise ManifestError(f"{what} {relative!r} resolves to {target}, outside the model's directory {base}; "
                            "a manifest may only name files inside its own directory")
    if not target.is_file():
        raise ManifestError(f"{what} {relative!r} is not a regular file")
    return target


@dataclass
class Artifact:
    """One file a variant's manifest lists, checked to lie inside the model's directory; `read()` gives the
    bytes whose sha256 and size are the manifest's (what an engine deserializes: it never reopens the path)."""

    path: Path  # resolved, inside the model's directory
    ref: FileRef
    what: str  # e.g. "variant 'affine': onnx file affine/model.onnx", for messages
    root: Path | None = None  # the model's resolved directory: what the opened file must still lie in
    verified: bool = False  # read (or checked) once against the manifest

    def check(self) -> None:
        """Verify a file no engine read (e.g. model.pt beside the ONNX), so a tampered directory is refused."""
        if not self.verified:
            self.read()

    def read(self) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)  # the resolved path: a link swapped in since is refused
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise ManifestError(f"{self.what}: cannot open {self.path} ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ManifestError(f"{self.what} is not a regular file")
            self._still_inside(fd)
            data = fh.read()
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.ref.sha256 or len(data) != self.ref.bytes:
            raise ManifestError(
                f"{self.what} has sha256 {actual[:12]}… ({len(data)} bytes), the manifest expects "
                f"{self.ref.sha256[:12]}… ({self.ref.bytes} bytes) — the file was modified after conversion; "
                "re-run `normfuse convert`")
        self.verified = True
        return data


    def _still_inside(self, fd: int) -> None:
        """What was opened, by its descriptor (Linux): a directory swapped for a link after the path was
        resolved cannot lead the read out of the model's directory."""
        opened = Path(f"/proc/self/fd/{fd}")
        if self.root is not None and opened.is_symlink() and not Path(os.readlink(opened)).is_relative_to(self.root):
            raise ManifestError(f"{self.what}: opened {os.readlink(opened)}, outside the model's directory")


def artifact(model_dir: Path, variant: str, role: str, ref: FileRef) -> Artifact:
    what = f"variant {variant!r}: {role} file {ref.path}"
    try:
        return Artifact(_inside(Path(model_dir), ref.path, what), ref, what, root=Path(model_dir).resolve())
    except FileNotFoundError:
        raise ManifestError(f"{what} is missing from {model_dir}") from None


def artifacts(model_dir: Path, variant: VariantInfo) -> dict[str, Artifact]:
    """role -> Artifact for every file of `variant`, each inside the model's directory (contents not read)."""
    return {role: artifact(model_dir, variant.name, role, ref) for role, ref in variant.files.items()}


def verify_files(model_dir: Path, variant: VariantInfo) -> dict[str, Path]:
    """Check every file of `variant` against its sha256 (and inside the model's directory); return role ->
    resolved path. For tools that hand paths on (convert, benchmarks); engines load through `artifacts`."""
    paths = {}
    for role, ref in variant.files.items():
        path = artifact(model_dir, variant.name, role, ref).path
        actual = sha256_file(path)
        if actual != ref.sha256:
            raise ManifestError(
                f"variant {variant.name!r}: {role} file {path} has sha256 {actual[:12]}…, "
                f"the manifest expects {ref.sha256[:12]}… — the file was modified after conversion; "
                "re-run `normfuse convert`"
            )
        paths[role] = path
    return paths


def list_models(repo: Path) -> list[str]:
    """Names of the model directories in a repository (those holding a manifest). Hidden directories are skipped:
    a conversion stages into `.NAME.partial-*` and renames into place, so a server starting meanwhile must not
    serve the half-built copy."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(p.parent.name for p in repo.glob(f"*/{MANIFEST_NAME}") if not p.parent.name.startswith("."))
