"""What the server serves: each model of the repository as one `Revision` (the conversion its manifest
describes), each servable variant of it as an engine + batcher (`Servable`).

`Repository` discovers models on disk, opens a revision (engines loaded, verified, warmed up), starts and stops
it, and looks requests up in the loaded set; which revision serves which model, and when it changes, is
service.control's (`ModelControl(repository)`). A model whose manifest or artifacts fail to load is kept with its
reason (not ready, listed as UNAVAILABLE in the repository index); the others are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.manifest import Manifest, list_models, manifest_sha256, read_revision
from service.batcher import Batch, Batcher
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import LABELS, Metrics, engine_info
from service.plans import engine_and_options, served_manifest
from service.revision import Revision, Servable
from service.settings import Settings
from service.shadow import UNFUSED, CompareStats, Shadow

log = logging.getLogger(__name__)
Loader = Callable[..., Engine]  # engines.load(repo, model, variant, backend, **options)


class Repository:
    """The models served (`models`: name -> the serving revision), opened from the model repository `root`."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.root = Path(settings.repo)
        self.compare = CompareStats(settings.compare_window)
        self.models: dict[str, Revision] = {}
        self._abandoned: set[int] = set()  # servables whose engine call outlived the drain (never closed)

    # -- discover and look up ----------------------------------------------------------------------
    def on_disk(self) -> list[str]:
        """The models of the repository directory (REPO/NAME/manifest.json), loaded or not."""
        return list_models(self.root)

    def entry(self, model: str) -> Revision:
        """The revision serving `model`; ModelNotFound names only what is loaded (the disk is never read here)."""
        try:
            return self.models[model]
        except KeyError:
            loaded = sorted(name for name, revision in self.models.items() if revision.variants)
            raise ModelNotFound(f"unknown model {model!r}; models loaded: {', '.join(loaded) or 'none'}") from None

    def get(self, model: str, version: str | None = None) -> Servable:
        """The servable for (model, version); no version means the default variant (`Revision.default`)."""
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

    def servables(self) -> list[Servable]:
        return [s for entry in self.models.values() for s in entry.variants.values()]

    def hung(self) -> list[str]:
        """Variants whose engine call has not come back `engine_recovery_s` after its timeout: the process is
        beyond saving (/v2/health/live turns false)."""
        limit = self.settings.engine_recovery_s
        return [f"{s.model}/{s.variant}: {s.batcher.hung}" for s in self.servables() if s.batcher.hung_for > limit]

    # -- open one revision (off the event loop), start it, stop it, close it ------------------------
    def build(self, name: str) -> Revision:
        """Read REPO/NAME's manifest and open, verify and warm up each servable variant (nothing started)."""
        entry = Revision(name, default_override=self.settings.default_variant)
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
                entry.add(self._open(manifest, variant))
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

    def start(self, entry: Revision) -> None:
        """Start the revision's batchers and shadows and point its metrics at it (on the event loop)."""
        unfused = entry.variants.get(UNFUSED)
        for name, servable in entry.variants.items():
            if unfused is not None and name != UNFUSED and self.settings.shadow_rate > 0:
                labels = servable.labels
                servable.shadow = Shadow(entry.name, name, unfused.batcher, self.settings.shadow_rate,
                                         lambda ratio, err, agree, labels=labels: self._record_pair(labels, ratio, err, agree))
            servable.batcher.start()
            self.metrics.queue_depth.labels(**servable.labels).set_function(lambda s=servable: s.batcher.depth)
            info = engine_info(servable.engine.describe(), entry.manifest, name, entry.label,
                               default=name == entry.default)
            self.metrics.engine.labels(**servable.labels).info(info)

    def unpublish(self, servable: Servable) -> None:
        """Drop a variant that no revision serves any more from /metrics' per-variant series."""
        values = [servable.labels[k] for k in LABELS]
        for metric in (self.metrics.queue_depth, self.metrics.engine):
            try:
                metric.remove(*values)
            except KeyError:
                pass

    async def stop(self, entry: Revision, timeout_s: float) -> None:
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

    def close_engines(self, entry: Revision) -> None:
        for servable in entry.variants.values():
            if id(servable) not in self._abandoned:
                servable.engine.close()

    def close(self) -> None:
        for entry in self.models.values():
            self.close_engines(entry)

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
