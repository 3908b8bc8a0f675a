"""What the server serves: each model of the repository as one *revision* (the conversion its manifest
describes), each servable variant of it as an engine + batcher.

A revision is built complete (service.control: beside the one serving, then swapped in). A model whose manifest
or artifacts fail to load is kept with its reason (not ready, listed as UNAVAILABLE in the repository index);
the others are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.manifest import InputConstraint, Manifest, manifest_sha256, read_revision
from service.batcher import Batch, Batcher
from service.control import ModelControl
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import LABELS, Children, Metrics, ServableStats
from service.plans import engine_and_options, served_manifest
from service.settings import Settings
from service.shadow import UNFUSED, CompareStats, Shadow
from service.validation import check_request

log = logging.getLogger(__name__)
Loader = Callable[..., Engine]  # engines.load(repo, model, variant, backend, **options)


@dataclass
class Servable:
    """One variant of one model: its engine, its batcher, its counters."""

    model: str
    variant: str
    engine: Engine
    labels: dict[str, str]
    batcher: Batcher = field(init=False)  # built right after: its callbacks need the servable
    stats: ServableStats = field(default_factory=ServableStats)
    shadow: Shadow | None = None
    constraints: list[InputConstraint] = field(default_factory=list)  # the manifest's, checked before queueing
    children: Children = field(init=False, repr=False)  # labelled metric children, cached
    # requests holding this servable from `Repository.get` to their answer: every protocol's infer path adds 1
    # and takes it back in its `finally`; a replaced revision drains only once none does (service.control)
    users: int = 0

    def __post_init__(self) -> None:
        self.children = Children(self.labels)

    def check(self, arrays: dict[str, np.ndarray]) -> int:
        """The request validation every protocol calls before `batcher.submit`: InputError (400) or the rows."""
        return check_request(self.engine.inputs, self.constraints, arrays)


@dataclass
class ModelEntry:
    """One revision of one model: what its manifest (sha256 `sha256`) describes, as loaded."""

    name: str
    manifest: Manifest | None = None
    variants: dict[str, Servable] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # variant (or "*" for the model) -> reason
    default_override: str | None = None  # Settings.default_variant
    sha256: str = ""  # of manifest.json's bytes

    @property
    def revision(self) -> str:
        """Which conversion this is: when it was converted, and its manifest's sha256 (12 digits)."""
        if self.manifest is None:
            return self.sha256[:12]
        return f"{self.manifest.created_at.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{self.sha256[:12]}"

    @property
    def dead(self) -> dict[str, str]:
        """Variants that loaded but have since stopped taking work: a batcher that stopped (never expected; see
        Batcher.alive), or an engine call past engine_timeout_s (Batcher.hung)."""
        return {v: f"batcher stopped: {s.batcher.dead}" if s.batcher.dead else f"engine not responding: {s.batcher.hung}"
                for v, s in self.variants.items() if not s.batcher.ready}

    @property
    def ready(self) -> bool:
        return bool(self.variants) and not self.failed and not self.dead

    @property
    def default(self) -> str:
        """The variant an unversioned request gets: the manifest's default unless the setting overrides it."""
        return self.default_override or self.manifest.default_variant

    @property
    def reason(self) -> str:
        return "; ".join(f"{v}: {why}" if v != "*" else why for v, why in {**self.failed, **self.dead}.items())


class Repository(ModelControl):
    """The models served (`models`: name -> the serving revision); model control comes from ModelControl."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.root = Path(settings.repo)
        self.compare = CompareStats(settings.compare_window)
        self.models: dict[str, ModelEntry] = {}
        self._abandoned: set[int] = set()  # servables whose engine call outlived the drain (never closed)
        super().__init__()

    # -- lookup ----------------------------------------------------------------------------------
    def entry(self, model: str) -> ModelEntry:
        try:
            return self.models[model]
        except KeyError:
            raise ModelNotFound(f"unknown model {model!r}; this server has {sorted(self.models)}"
                                f"{self.not_loaded_hint(model)}") from None

    def get(self, model: str, version: str | None = None) -> Servable:
        """The servable for (model, version); no version means the default variant (`ModelEntry.default`)."""
        entry = self.entry(model)
        if entry.manifest is None:
            raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
        variant = version or entry.default
        if variant in entry.variants:
            servable = entry.variants[variant]
            if not servable.batcher.ready:
                raise ModelNotReady(f"model {model!r} version {variant!r} is not ready: {entry.dead[variant]}")
            return servable
        if variant in entry.failed:
            raise ModelNotReady(f"model {model!r} version {variant!r} is not ready: {entry.failed[variant]}")
        raise ModelNotFound(f"model {model!r} has no version {variant!r}; versions: {entry.manifest.servable()}")

    # -- one revision: build (off the event loop), publish, close ---------------------------------
    def build(self, name: str) -> ModelEntry:
        """Read REPO/NAME's manifest and open, verify and warm up each servable variant (nothing started)."""
        entry = ModelEntry(name, default_override=self.settings.default_variant)
        model_dir = self.root / name
        wanted = self.settings.default_variant
        try:
            manifest, entry.sha256 = read_revision(model_dir)
            manifest = served_manifest(manifest, only_default=self.settings.openvino_plans == "default")  # plans
            if wanted and wanted not in manifest.servable():
                raise ValueError(f"NORMFUSE_DEFAULT_VARIANT / --default-variant {wanted!r}: model {name!r} has no such "
                                 f"servable variant; it has {manifest.servable()}")
        except Exception as exc:  # noqa: BLE001 - keep serving the other models
            entry.failed["*"], entry.sha256 = str(exc), manifest_sha256(model_dir) or ""
            log.error("model %s not loaded: %s", name, exc)
            return entry
        entry.manifest = manifest
        for variant in manifest.servable():
            try:
                entry.variants[variant] = self._open(manifest, variant)
            except Exception as exc:  # noqa: BLE001
                entry.failed[variant] = str(exc)
                log.error("model %s variant %s not loaded: %s", name, variant, exc)
        return entry

    def _open(self, manifest: Manifest, variant: str) -> Servable:
        s = self.settings
        backend, options = engine_and_options(manifest, variant, s, backend_options(s))  # a plan: OpenVINO
        engine = self.loader(s.repo, manifest.name, variant, backend, **options)
        limit = min(s.max_batch_size, manifest.max_batch_size, engine.max_batch_size or s.max_batch_size)
        for size in sorted({*s.warmup_batch_sizes, *s.preferred_batch_sizes, limit}):
            if size <= limit:
                engine.infer(warmup_inputs(engine, size))
        labels = {"model": manifest.name, "variant": variant, "backend": engine.backend or backend}
        servable = Servable(manifest.name, variant, engine, labels, constraints=manifest.constraints)
        servable.batcher = Batcher(
            engine, max_batch_size=limit, max_queue_delay_s=s.max_queue_delay_ms / 1e3,
            preferred_batch_sizes=[p for p in s.preferred_batch_sizes if p <= limit],
            max_queue_size=s.max_queue_size, engine_timeout_s=s.engine_timeout_s,
            on_batch=lambda batch: self._observe(servable, batch),
            on_drop=lambda reason: self.metrics.dropped.labels(**labels, reason=reason).inc(),
        )
        return servable

    def start(self, entry: ModelEntry) -> None:
        """Start the revision's batchers and shadows and point its metrics at it (on the event loop)."""
        unfused = entry.variants.get(UNFUSED)
        for name, servable in entry.variants.items():
            if unfused is not None and name != UNFUSED and self.settings.shadow_rate > 0:
                labels = servable.labels
                servable.shadow = Shadow(entry.name, name, unfused.batcher, self.settings.shadow_rate,
                                         lambda ratio, err, agree, labels=labels: self._record_pair(labels, ratio, err, agree))
            servable.batcher.start()
            self.metrics.queue_depth.labels(**servable.labels).set_function(lambda s=servable: s.batcher.depth)
            files = entry.manifest.variants[name].files
            info = {k: str(v) for k, v in servable.engine.describe().items()}
            info["onnx_sha256"] = files["onnx"].sha256 if "onnx" in files else ""
            info["revision"] = entry.revision
            info["exact"] = str(entry.manifest.variants[name].exact).lower()  # "false": a gated lossy variant (int8)
            self.metrics.engine.labels(**servable.labels).info(info)

    def unpublish(self, servable: Servable) -> None:
        """Drop a variant that no revision serves any more from /metrics' per-variant series."""
        values = [servable.labels[k] for k in LABELS]
        for metric in (self.metrics.queue_depth, self.metrics.engine):
            try:
                metric.remove(*values)
            except KeyError:
                pass

    async def stop(self, entry: ModelEntry, timeout_s: float) -> None:
        """Answer what the revision accepted, stop its shadows and batchers within `timeout_s`. An engine still
        running a call then is left open, never waited for (its thread is a daemon) and never closed under the
        call."""
        servables = list(entry.variants.values())
        await asyncio.gather(*(s.shadow.close() for s in servables if s.shadow is not None))
        idle = await asyncio.gather(*(s.batcher.drain(timeout_s) for s in servables))
        for servable, ok in zip(servables, idle, strict=True):
            if not ok:
                self._abandoned.add(id(servable))
                log.error("%s/%s: an engine call is still running after the drain deadline; not closing it",
                          servable.model, servable.variant)

    def close_engines(self, entry: ModelEntry) -> None:
        for servable in entry.variants.values():
            if id(servable) not in self._abandoned:
                servable.engine.close()

    # -- observers -------------------------------------------------------------------------------
    def _observe(self, servable: Servable, batch: Batch) -> None:
        labels, children = servable.labels, servable.children
        children.of(self.metrics.compute).observe(batch.compute_s)
        children.of(self.metrics.batch_size).observe(batch.rows)
        servable.stats.record_batch(batch.rows, batch.compute_s)
        self.compare.add_latency(servable.model, servable.variant, batch.rows, batch.compute_s)
        if servable.shadow is not None and servable.shadow.offer(batch) == "skipped":
            self.metrics.shadow_skipped.labels(**labels).inc()

    def _record_pair(self, labels: dict[str, str], ratio: float, abs_error: float, agreement: float | None = None) -> None:
        self.metrics.shadow_ratio.labels(**labels).observe(ratio)
        self.metrics.shadow_error.labels(**labels).observe(abs_error)
        if agreement is not None:
            self.metrics.shadow_agreement.labels(**labels).observe(agreement)
        self.compare.add_pair(labels["model"], labels["variant"], ratio, abs_error, agreement)

    def servables(self) -> list[Servable]:
        return [s for entry in self.models.values() for s in entry.variants.values()]

    def hung(self) -> list[str]:
        """Variants whose engine call has not come back `engine_recovery_s` after its timeout: the process is
        beyond saving (/v2/health/live turns false)."""
        limit = self.settings.engine_recovery_s
        return [f"{s.model}/{s.variant}: {s.batcher.hung}" for s in self.servables() if s.batcher.hung_for > limit]

    # -- shutdown --------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Stop every serving revision within `timeout_s`, and wait for replaced ones still draining."""
        await asyncio.gather(*(self.stop(entry, timeout_s) for entry in self.models.values()), self.retired())

    def close(self) -> None:
        for entry in self.models.values():
            self.close_engines(entry)


def backend_options(s: Settings) -> dict:
    """The engine options of the chosen backend, from the settings: each backend gets only what it takes."""
    options: dict = {"intra_op_threads": s.intra_op_threads} if s.intra_op_threads else {}
    if s.backend == "onnxruntime":
        if s.ort_providers:
            options["providers"] = list(s.ort_providers)
        options["allow_spinning"] = s.ort_allow_spinning
    elif s.backend == "torch":
        options.update(device=s.device, mode=s.torch_mode)
    elif s.backend == "tensorrt" and s.precision:
        options["precision"] = s.precision
    return options


def warmup_inputs(engine: Engine, rows: int) -> dict[str, np.ndarray]:
    """Zeros of each input's shape with `rows` in the batch axis (other dynamic axes set to 1)."""
    return {spec.name: np.zeros((rows, *[d if d > 0 else 1 for d in spec.shape[1:]]), spec.dtype)
            for spec in engine.inputs}
