"""One revision of one model (the conversion its manifest describes, as loaded) and its servable variants.

Requests hold the revision they were routed to with `async with revision.lease():` from lookup to answer; a
replaced or unloaded revision drains (service.control) only once no request holds it, and a lease asked of a
revision that is already closing is refused with 503 + Retry-After (the next request gets the new revision).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timezone

import numpy as np

from engines.base import Engine
from engines.manifest import InputConstraint, Manifest
from service.batcher import Batcher
from service.errors import ModelNotReady
from service.metrics import Children, ServableStats
from service.shadow import Shadow
from service.validation import check_request


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
    revision: Revision | None = field(default=None, repr=False)  # the revision it belongs to

    def __post_init__(self) -> None:
        self.children = Children(self.labels)

    def check(self, arrays: dict[str, np.ndarray]) -> int:
        """The request validation every protocol calls before `batcher.submit`: InputError (400) or the rows."""
        return check_request(self.engine.inputs, self.constraints, arrays)


@dataclass
class Revision:
    """One revision of one model: what its manifest (sha256 `sha256`) describes, as loaded."""

    name: str
    manifest: Manifest | None = None
    variants: dict[str, Servable] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # variant (or "*" for the model) -> reason
    default_override: str | None = None  # Settings.default_variant
    sha256: str = ""  # of manifest.json's bytes
    holders: int = 0  # requests inside `lease()`
    closing: bool = False  # replaced or unloaded: takes no new lease

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Revision]:
        """Hold this revision from lookup to answer, so that it is not drained under the request."""
        if self.closing:
            raise ModelNotReady(f"model {self.name!r} revision {self.label} is being replaced or unloaded; retry")
        self.holders += 1
        try:
            yield self
        finally:
            self.holders -= 1

    def add(self, servable: Servable) -> None:
        servable.revision = self
        self.variants[servable.variant] = servable

    @property
    def label(self) -> str:
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
