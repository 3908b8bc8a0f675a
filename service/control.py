"""Model control (Triton's `--model-control-mode none|poll|explicit` and its repository extension).

`ModelControl(repository)` decides which revision of each model the `Repository` serves. Its API, called by the
REST and gRPC adapters: `await control.load(name)`, `await control.unload(name)`, `control.index(ready_only)`.
Start-up, the poller and shutdown (`drain`) use the same steps:

* **load** builds the repository's current revision of a model beside the one serving (engines opened,
  sha256-verified, warmed up, off the event loop), then swaps it in at once: new requests get the new revision;
  the old one takes no new lease, answers every request it accepted (each holds it through `Revision.lease()`),
  drains and closes its engines (`_retire`). A load that fails leaves the serving revision in place, with the
  reason in the index, the log and `normfuse_model_load_failures_total{model}`. One load or unload of a model at
  a time (a lock per model).
* **poll** (`scan`, every `repository_poll_secs`): a model whose files changed (`fingerprint`: the manifest's
  sha256, each artifact's size and mtime) is loaded again, a new model directory is loaded, a failed load is not
  retried until the files change, and a model whose directory is gone is unloaded only once it has been
  missing on two scans at least MISSING_GRACE_S apart (a conversion's rename may leave a brief gap where the
  filesystem cannot swap two directories in one step).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engines.manifest import manifest_sha256
from service.errors import ModelControlError, ModelNotFound
from service.plans import refused_rows
from service.protocol import ProtocolError

if TYPE_CHECKING:
    from service.repository import Repository
    from service.revision import Revision

log = logging.getLogger(__name__)
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"  # Triton's model states in the index
MISSING_GRACE_S = 5.0


@dataclass
class Control:
    """Model control's state of one model, beside the revision serving it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: bool = False
    reason: str = ""  # why the last load failed while an older revision serves, or why the model is not loaded
    attempted: str = ""  # `fingerprint` at the last load: the poller does not retry files that failed
    missing_since: float | None = None  # poll mode: when a scan first found the model's directory gone


class ModelControl:
    """Locks, polling, the index, load and unload over `repository` (which opens, starts, stops and closes)."""

    def __init__(self, repository: Repository) -> None:
        self.repo = repository
        self.settings, self.root, self.metrics = repository.settings, repository.root, repository.metrics
        self.control: dict[str, Control] = {}
        self._retiring: set[asyncio.Task] = set()

    @property
    def models(self) -> dict[str, Revision]:
        return self.repo.models

    # -- the API ---------------------------------------------------------------------------------
    async def start_up(self) -> None:
        """Load what the mode loads at start: every model (none, poll), or `load_model` (explicit)."""
        s = self.settings
        names = self.repo.on_disk()
        if s.model_control_mode == "explicit" and "*" not in s.load_model:
            names = list(s.load_model)
        elif not names:
            log.warning("no models (no */manifest.json) in %s", self.root)
        for name in names:
            await self._load(name)

    async def load(self, name: str, parameters: dict | None = None) -> None:
        """Load (or reload) `name` without downtime; ModelControlError with the reason if it failed. Triton's
        `parameters` that override the model's files (`config`, `file:...`) are refused (ProtocolError)."""
        self._allowed("load", name)
        if parameters is not None and not isinstance(parameters, dict):
            raise ProtocolError(f"load parameters must be a JSON object, got {type(parameters).__name__}")
        overrides = sorted(k for k in (parameters or {}) if k == "config" or k.startswith("file:"))
        if overrides:
            raise ProtocolError(f"load parameters {overrides} are not supported: normfuse loads the manifest "
                                f"and artifacts `normfuse convert` wrote to {self.root}/{name}")
        if name not in self.repo.on_disk():
            raise ModelNotFound(f"no model {name!r} in the model repository {self.root} (it has: "
                                f"{', '.join(self.repo.on_disk()) or 'nothing'}); run `normfuse convert SOURCE "
                                f"--name {name} --repo {self.root}` first")
        failure = await self._load(name)
        if failure is not None:
            raise ModelControlError(f"failed to load model {name!r}: {failure}")

    async def unload(self, name: str) -> None:
        """Stop serving `name`: requests it accepted are answered, then its engines close."""
        self._allowed("unload", name)
        if name not in self.models:
            loaded = sorted(n for n, entry in self.models.items() if entry.variants)
            raise ModelControlError(f"model {name!r} is not loaded, so it cannot be unloaded; loaded: "
                                    f"{', '.join(loaded) or 'none'}")
        await self._unload(name, "unloaded")

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: a row per (model, version) with its state and, if any, a reason."""
        names = sorted({*self.repo.on_disk(), *self.models, *self.control})
        rows = [row for name in names for row in self._rows(name)]
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    # -- poll mode -------------------------------------------------------------------------------
    async def poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except Exception:  # a scan that fails must not stop the next one
                log.exception("repository scan of %s failed", self.root)

    async def scan(self) -> None:
        """Load what is new or re-converted; unload what has been gone for MISSING_GRACE_S."""
        present, now = self.repo.on_disk(), time.monotonic()
        for name in present:
            control = self.control.setdefault(name, Control())
            control.missing_since = None
            seen = await asyncio.to_thread(fingerprint, self.root / name)  # stat calls: slow on NFS, off the loop
            if seen is not None and seen != control.attempted and not control.lock.locked():
                await self._load(name)
        for name in [n for n in self.models if n not in present]:
            control = self.control.setdefault(name, Control())
            if control.missing_since is None:
                control.missing_since = now
            elif now - control.missing_since >= MISSING_GRACE_S:
                await self._unload(name, f"its directory left the repository {self.root}")

    # -- the steps -------------------------------------------------------------------------------
    async def _load(self, name: str) -> str | None:
        """Build the current revision of `name`, swap it in if it loaded (or nothing serves); why it failed."""
        control = self.control.setdefault(name, Control())
        async with control.lock:
            control.loading = True
            try:
                seen = await asyncio.to_thread(fingerprint, self.root / name)  # first: a later change shows next scan
                new = await asyncio.to_thread(self.repo.build, name)
            finally:
                control.loading = False
            if new.variants and manifest_sha256(self.root / name) != new.sha256:  # replaced while we read it
                await self._discard(new)
                new.manifest, new.variants, new.sha256 = None, {}, ""  # no sha256: the poller retries
                new.failed = {"*": "the model directory was replaced while it loaded; the next load reads the new one"}
            control.attempted = seen if new.sha256 else ""
            old = self.models.get(name)
            if new.ready or old is None or not old.variants:
                self._install(new, old)
                control.reason = ""
            if new.ready:
                log.info("model %s: revision %s serving, variants %s", name, new.label, sorted(new.variants))
                return None
            self.metrics.load_failures.labels(model=name).inc()
            failure = f"revision {new.label or '(unreadable)'} failed to load: {new.reason}"
            if self.models[name] is not new:
                await self._discard(new)
                control.reason = f"{failure}; revision {old.label} still serving"
            log.error("model %s: %s", name, control.reason or failure)
            return failure

    async def _discard(self, entry: Revision) -> None:
        """Close a revision that was built but never served (its batchers' engine threads, its engines)."""
        await self.repo.stop(entry, 1.0)
        self.repo.close_engines(entry)

    def _install(self, new: Revision, old: Revision | None) -> None:
        self.repo.start(new)
        self.models[new.name] = new  # from here on, requests get the new revision
        if new.variants:
            self.metrics.revisions.labels(model=new.name).inc()
        if old is not None:
            for variant in old.variants.keys() - new.variants.keys():
                self.repo.unpublish(old.variants[variant])
            self._retire(old)

    async def _unload(self, name: str, reason: str) -> None:
        control = self.control.setdefault(name, Control())
        async with control.lock:
            entry = self.models.pop(name, None)
            if entry is None:
                return
            control.reason, control.attempted = reason, ""
            for servable in entry.variants.values():
                self.repo.unpublish(servable)
            log.info("model %s: unloading revision %s (%s)", name, entry.label, reason)
        await self._retire(entry)

    def _retire(self, entry: Revision) -> asyncio.Task:
        """Drain and close a revision no longer routed to, in the background (`retired` waits for all); it takes
        no new lease from here on (a request that looked it up just before is answered 503 + Retry-After)."""
        entry.closing = True
        task = asyncio.get_running_loop().create_task(self._close(entry), name=f"retire {entry.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _close(self, entry: Revision) -> None:
        servables, timeout_s = list(entry.variants.values()), self.settings.drain_timeout_s
        end = time.monotonic() + timeout_s
        while entry.holders and time.monotonic() < end:  # requests that got it before the swap
            await asyncio.sleep(0.01)
        await self.repo.stop(entry, max(1.0, end - time.monotonic()))
        await asyncio.to_thread(self.repo.close_engines, entry)
        if servables:
            self.metrics.revisions.labels(model=entry.name).dec()
        entry.variants.clear()  # the engines' memory went with close(); the servables' small cycles go with the next gc
        log.info("model %s: revision %s closed", entry.name, entry.label)

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: stop every serving revision within `timeout_s`, and wait for replaced ones still draining."""
        await asyncio.gather(*(self.repo.stop(entry, timeout_s) for entry in self.models.values()), self.retired())

    async def retired(self) -> None:
        """Wait until every replaced or unloaded revision has drained and closed."""
        while self._retiring:
            await asyncio.gather(*self._retiring)

    # -- helpers ---------------------------------------------------------------------------------
    def _allowed(self, action: str, name: str) -> None:
        mode = self.settings.model_control_mode
        if mode == "none":
            raise ModelControlError(
                f"cannot {action} model {name!r}: model control is off (model control mode 'none' loads every model "
                "at start); start the server with --model-control-mode explicit "
                "(NORMFUSE_MODEL_CONTROL_MODE=explicit) to load and unload models through this API")
        if mode == "poll":
            raise ModelControlError(
                f"cannot {action} model {name!r} in model control mode 'poll': the server follows the repository "
                f"{self.root} (scanned every {self.settings.repository_poll_secs:g} s); convert into it or remove "
                "the model's directory, or use --model-control-mode explicit")

    def _why_not_loaded(self, name: str) -> str:
        control = self.control.get(name)
        if control is not None and control.reason:
            return control.reason
        return {"explicit": f"load it with POST /v2/repository/models/{name}/load",
                "poll": "the next repository scan loads it",
                "none": "it appeared after start (model control mode 'none' loads models only at start)",
                }[self.settings.model_control_mode]

    def _rows(self, name: str) -> list[dict]:
        entry, control = self.models.get(name), self.control.get(name) or Control()
        if entry is None or entry.manifest is None:
            if control.loading:
                return [{"name": name, "version": "", "state": LOADING, "reason": "loading"}]
            reason = (entry.reason if entry is not None else "") or self._why_not_loaded(name)
            return [{"name": name, "version": "", "state": UNAVAILABLE, "reason": reason}]
        rows = []
        for version in entry.manifest.servable():
            servable = entry.variants.get(version)
            ready = servable is not None and servable.batcher.ready
            why = "" if ready else entry.failed.get(version) or entry.dead.get(version) or entry.reason
            model_wide = "loading a new revision" if control.loading else control.reason
            reason = "; ".join(part for part in (why, model_wide) if part)
            rows.append({"name": name, "version": version, "state": READY if ready else UNAVAILABLE,
                         **({"reason": reason} if reason else {})})
        return rows + refused_rows(name, entry.manifest)  # plans this CPU does not run natively (service.plans)


def fingerprint(model_dir: Path) -> str | None:
    """What the poller compares between scans: the manifest's sha256 and each artifact's path, size and mtime
    (hidden files such as the deploy's `.converted` marker aside), so that TensorRT plans built after the manifest
    was written are picked up too. None while the directory cannot be read (e.g. mid-rename)."""
    sha = manifest_sha256(model_dir)
    try:
        files = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in model_dir.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))
    except OSError:
        return None
    return None if sha is None else hashlib.sha256(repr((sha, files)).encode()).hexdigest()
