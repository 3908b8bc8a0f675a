"""Every metric the server exports, in one module with one prefix (`normfuse_`), on one registry per app.

Latency histograms are labelled `model`, `variant`, `backend`; the end-to-end request histogram and the request
counter also `protocol` (`http` or `grpc`). Buckets are geometric for time (50 µs … ~13 s)
and powers of two for batch size. `ServableStats` keeps Triton's statistics-extension counters per variant.

A version's engine and precision are not labels of every series (that would multiply them): one
`normfuse_engine_info` series per version carries `runtime`, `precision` and `exact` (`engine_info`), and the
dashboard joins on (model, variant) (deploy/prometheus/rules.yml, `normfuse:plan:info`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from engines.manifest import Manifest

LABELS = ("model", "variant", "backend")
PROTOCOLS = ("http", "grpc")  # the `protocol` label: which front end answered the request
TIME_BUCKETS = tuple(round(50e-6 * 2 ** (i / 2), 7) for i in range(37))  # 50 µs · √2^i, up to ~13 s
BATCH_BUCKETS = tuple(2.0**i for i in range(11))  # 1 … 1024
# Paired shadow ratios: 5 % steps over 0.5 … ~2.06 (norm rewrites move latency by a few %), coarse beyond it for
# plans (OpenVINO bf16/int8 on AMX: 0.2-0.3; a bf16 plan emulated on a CPU without bf16 units: ~33)
RATIO_BUCKETS = (0.0625, 0.125, 0.25, 0.375, *(round(0.5 * 1.05**i, 4) for i in range(30)), 3.0, 4.0, 8.0, 16.0,
                 32.0, 64.0)
ERROR_BUCKETS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
AGREEMENT_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)  # top-1 agreement per shadowed batch


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.request = Histogram("normfuse_request_duration_seconds", "End-to-end inference request time",
                                 (*LABELS, "protocol"), buckets=TIME_BUCKETS, registry=r)
        self.queue = Histogram("normfuse_queue_duration_seconds", "Time a request waited in the batcher's queue",
                               LABELS, buckets=TIME_BUCKETS, registry=r)
        self.compute = Histogram("normfuse_compute_duration_seconds", "Engine run time of one batch",
                                 LABELS, buckets=TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("normfuse_batch_size", "Rows per engine run", LABELS,
                                    buckets=BATCH_BUCKETS, registry=r)
        # code: the HTTP status, or for gRPC the HTTP status of the same error (service.errors.GRPC_CODES)
        self.requests = Counter("normfuse_requests", "Inference requests by protocol and HTTP status",
                                (*LABELS, "protocol", "code"), registry=r)
        self.dropped = Counter("normfuse_dropped_requests", "Queued requests dropped before compute",
                               (*LABELS, "reason"), registry=r)
        self.refused = Counter("normfuse_refused_requests", "Inference requests answered 503 before their body was "
                               "read (the server was at max_inflight)", registry=r)
        self.queue_depth = Gauge("normfuse_queue_depth", "Requests waiting in the batcher's queue", LABELS,
                                 registry=r)
        self.inflight = Gauge("normfuse_inflight_requests", "Inference requests accepted and not yet answered",
                              LABELS, registry=r)
        self.engine = Info("normfuse_engine", "Engine provenance per variant (revision: the serving conversion)",
                           LABELS, registry=r)
        self.load_failures = Counter("normfuse_model_load_failures", "Loads of a model revision that failed (the "
                                     "revision serving before, if any, kept serving)", ("model",), registry=r)
        self.revisions = Gauge("normfuse_model_revisions", "Revisions of a model holding engines: 1 serving, "
                               "+1 while a replaced one drains", ("model",), registry=r)
        self.shadow_ratio = Histogram("normfuse_shadow_latency_ratio",
                                      "Variant compute time / unfused compute time on the same batch",
                                      LABELS, buckets=RATIO_BUCKETS, registry=r)
        self.shadow_error = Histogram("normfuse_shadow_abs_error", "max |variant - unfused| on the same batch",
                                      LABELS, buckets=ERROR_BUCKETS, registry=r)
        self.shadow_skipped = Counter("normfuse_shadow_skipped", "Sampled batches not shadowed (worker busy)",
                                      LABELS, registry=r)
        self.shadow_agreement = Histogram("normfuse_shadow_agreement",
                                          "Top-1 (argmax) agreement of variant and unfused on the same batch, 0-1",
                                          LABELS, buckets=AGREEMENT_BUCKETS, registry=r)


def engine_info(described: dict[str, str], manifest: Manifest, variant: str, revision: str, *,
                default: bool) -> dict[str, str]:
    """`normfuse_engine_info`'s labels for one version: the engine's own description, plus the ONNX file's sha256,
    the revision, whether unversioned requests get it (`default`: on a mixed CPU pool pods may differ), and the
    plan's `precision` and `exact` as the manifest records them (an ONNX Runtime int8 variant's engine has fp32
    inputs and outputs and would describe itself as fp32)."""
    info = {k: str(v) for k, v in described.items()}
    record = manifest.variants[variant]
    plans = manifest.plans.plans if manifest.plans is not None else {}
    plan = plans.get(variant)
    if plan is not None and plan.engine == info.get("runtime"):  # not when e.g. TensorRT serves the variant
        info["precision"] = plan.precision
    elif plan is None and not record.exact and info.get("runtime") == "onnxruntime" and info.get("precision") == "fp32":
        info["precision"] = "int8"  # ONNX Runtime's lossy variant in a manifest without plans: int8
    info["onnx_sha256"] = record.files["onnx"].sha256 if "onnx" in record.files else ""
    info["revision"] = revision
    info["default"] = str(default).lower()
    info["exact"] = str(record.exact).lower()  # "false": a gated lossy variant (int8) or a reduced-precision plan
    return info


class Children:
    """One servable's labelled metric children, each looked up once: `metric.labels(...)` takes a lock and builds
    a key on every call. Created on first use, so a series appears in /metrics exactly when it did before."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self._cache: dict[tuple, object] = {}

    def of(self, metric, *values: str):
        """The child for this servable's labels followed by `values` (e.g. protocol, code), in label order."""
        key = (metric, values)
        child = self._cache.get(key)
        if child is None:
            child = metric.labels(*self.labels.values(), *values)
            self._cache[key] = child
        return child


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def dump(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ServableStats:
    """Triton's statistics extension for one (model, variant)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))

    def record_request(self, ok: bool, seconds: float, queue_s: float | None, rows: int) -> None:
        (self.success if ok else self.fail).add(seconds)
        if ok:
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)
        if queue_s is not None:
            self.queue.add(queue_s)

    def record_batch(self, rows: int, compute_s: float) -> None:
        self.execution_count += 1
        self.compute_infer.add(compute_s)
        self.batches[rows].add(compute_s)

    def dump(self, name: str, version: str) -> dict:
        """Only what is measured: compute_input/compute_output and the cache counters are left out (no input or
        output copy is timed apart from the engine call, and there is no response cache)."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.dump(), "fail": self.fail.dump(), "queue": self.queue.dump(),
                "compute_infer": self.compute_infer.dump(),
            },
            "batch_stats": [{"batch_size": size, "compute_infer": d.dump()} for size, d in sorted(self.batches.items())],
        }
