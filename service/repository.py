"""What the server serves: every model of the repository, each servable variant as an engine + batcher.

A model whose manifest or artifacts fail to load is kept with its reason (not ready, listed as UNAVAILABLE
in the repository index); the others are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.manifest import Manifest, list_models, read_manifest
from service.batcher import Batch, Batcher
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import Children, Metrics, ServableStats
from service.settings import Settings
from service.shadow import UNFUSED, CompareStats, Shadow

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
    children: Children = field(init=False, repr=False)  # labelled metric children, cached

    def __post_init__(self) -> None:
        self.children = Children(self.labels)


@dataclass
class ModelEntry:
    name: str
    manifest: Manifest | None = None
    variants: dict[str, Servable] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # variant (or "*" for the model) -> reason
    default_override: str | None = None  # Settings.default_variant

    @property
    def dead(self) -> dict[str, str]:
        """Variants that loaded but whose batcher has since stopped (never expected; see Batcher.alive)."""
        return {v: f"batcher stopped: {s.batcher.dead}" for v, s in self.variants.items() if not s.batcher.alive}

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


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.compare = CompareStats(settings.compare_window)
        self.models: dict[str, ModelEntry] = {}

    # -- lookup ----------------------------------------------------------------------------------
    def entry(self, model: str) -> ModelEntry:
        try:
            return self.models[model]
        except KeyError:
            raise ModelNotFound(f"unknown model {model!r}; this server has {sorted(self.models)}") from None

    def get(self, model: str, version: str | None = None) -> Servable:
        """The servable for (model, version); no version means the default variant (`ModelEntry.default`)."""
        entry = self.entry(model)
        if entry.manifest is None:
            raise ModelNotReady(f"model {model!r} is not ready: {entry.reason}")
        variant = version or entry.default
        if variant in entry.variants:
            servable = entry.variants[variant]
            if not servable.batcher.alive:
                raise ModelNotReady(f"model {model!r} version {variant!r} is not ready: {entry.dead[variant]}")
            return servable
        if variant in entry.failed:
            raise ModelNotReady(f"model {model!r} version {variant!r} is not ready: {entry.failed[variant]}")
        raise ModelNotFound(f"model {model!r} has no version {variant!r}; versions: {entry.manifest.servable()}")

    # -- lifecycle -------------------------------------------------------------------------------
    async def load_all(self) -> None:
        names = list_models(self.settings.repo)
        if not names:
            log.warning("no models (no */manifest.json) in %s", self.settings.repo)
        for name in names:
            entry = self.models[name] = ModelEntry(name)
            wanted = self.settings.default_variant
            try:
                manifest = read_manifest(Path(self.settings.repo) / name)
                if wanted and wanted not in manifest.servable():
                    raise ValueError(f"NORMFUSE_DEFAULT_VARIANT / --default-variant {wanted!r}: model {name!r} has no such "
                                     f"servable variant; it has {manifest.servable()}")
            except Exception as exc:  # noqa: BLE001 - keep serving the other models
                entry.failed["*"] = str(exc)
                log.error("model %s not loaded: %s", name, exc)
                continue
            entry.manifest, entry.default_override = manifest, wanted
            for variant in entry.manifest.servable():
                try:
                    entry.variants[variant] = await asyncio.to_thread(self._open, entry.manifest, variant)
                except Exception as exc:  # noqa: BLE001
                    entry.failed[variant] = str(exc)
                    log.error("model %s variant %s not loaded: %s", name, variant, exc)
            self._attach_shadows(entry)
            log.info("model %s: ready=%s variants=%s", name, entry.ready, sorted(entry.variants))

    def _open(self, manifest: Manifest, variant: str) -> Servable:
        s = self.settings
        engine = self.loader(s.repo, manifest.name, variant, s.backend, **backend_options(s))
        limit = min(s.max_batch_size, manifest.max_batch_size, engine.max_batch_size or s.max_batch_size)
        for size in sorted({*s.warmup_batch_sizes, *s.preferred_batch_sizes, limit}):
            if size <= limit:
                engine.infer(warmup_inputs(engine, size))
        labels = {"model": manifest.name, "variant": variant, "backend": engine.backend or s.backend}
        servable = Servable(manifest.name, variant, engine, labels)
        servable.batcher = Batcher(
            engine, max_batch_size=limit, max_queue_delay_s=s.max_queue_delay_ms / 1e3,
            preferred_batch_sizes=[p for p in s.preferred_batch_sizes if p <= limit],
            max_queue_size=s.max_queue_size, on_batch=lambda batch: self._observe(servable, batch),
            on_drop=lambda reason: self.metrics.dropped.labels(**labels, reason=reason).inc(),
        )
        self.metrics.queue_depth.labels(**labels).set_function(lambda: servable.batcher.depth)
        files = manifest.variants[variant].files
        info = {k: str(v) for k, v in engine.describe().items()}
        info["onnx_sha256"] = files["onnx"].sha256 if "onnx" in files else ""
        info["exact"] = str(manifest.variants[variant].exact).lower()  # "false": a gated lossy variant (int8)
        self.metrics.engine.labels(**labels).info(info)
        return servable

    def _attach_shadows(self, entry: ModelEntry) -> None:
        unfused = entry.variants.get(UNFUSED)
        if unfused is None or self.settings.shadow_rate <= 0:
            return
        for name, servable in entry.variants.items():
            if name != UNFUSED:
                labels = servable.labels
                servable.shadow = Shadow(entry.name, name, unfused.batcher, self.settings.shadow_rate,
                                         lambda ratio, err, agree, labels=labels: self._record_pair(labels, ratio, err, agree))

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

    def start(self) -> None:
        for servable in self.servables():
            servable.batcher.start()

    async def drain(self, timeout_s: float) -> None:
        await asyncio.gather(*(s.shadow.close() for s in self.servables() if s.shadow is not None))
        await asyncio.gather(*(s.batcher.drain(timeout_s) for s in self.servables()))

    def close(self) -> None:
        for servable in self.servables():
            servable.engine.close()


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
