"""`normfuse bench grpc`: OIP v2 over gRPC vs REST with binary tensors on one `normfuse serve`, beside Triton's gRPC.

One `normfuse serve` with its default settings (REST and gRPC on the same process, batchers and engine) and
Triton (pytriton) serving the same ONNX file (the variant normfuse's unversioned requests get) with the same
max batch size and queue delay. Closed loop, batch-1 requests at each concurrency; every target receives one
pre-encoded request reused for every call: REST binary through `normfuse loadgen`'s aiohttp client, gRPC through
grpcio's asyncio stub with a prebuilt `ModelInferRequest` (the same client code for normfuse and Triton).
Rounds are interleaved (every target at every concurrency per round, the order rotated each round) so noise
shared by a round hits every target; ratios are taken within a round, and their medians reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import engines
from benchmarks import loadgen
from benchmarks.engines_bench import input_specs
from benchmarks.inputs import random_inputs
from benchmarks.peers import launch
from benchmarks.report import machine
from benchmarks.serving_bench import _serve_repo
from engines.base import datatype_of
from oip.stats import medians_by_label

log = logging.getLogger(__name__)
REST, GRPC, TRITON = "normfuse REST binary", "normfuse gRPC", "Triton gRPC (pytriton)"


@dataclass(frozen=True)
class GrpcBenchConfig:
    model: str = "vit-digits"
    concurrencies: tuple[int, ...] = (1, 32)
    rounds: int = 3
    step_seconds: float = 4.0
    step_requests: int = 4000
    triton: bool = True
    threads: int | None = None
    log_dir: Path = field(default=Path(".bench/logs"))


def grpc_request(model: str, inputs: dict, version: str = ""):
    """A `ModelInferRequest` carrying `inputs` as raw little-endian bytes, as tritonclient.grpc sends them."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request


async def closed_loop_grpc(address: str, request, concurrency: int, *, max_requests: int, max_seconds: float,
                           label: str, timeout: float = 30.0, warmup: int = 1) -> loadgen.LoadResult:
    """`loadgen.closed_loop` over gRPC: `concurrency` calls in flight on one channel, back to back."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    samples: list[loadgen.Sample] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def call(scheduled: float) -> loadgen.Sample:
            try:
                await stub.ModelInfer(request, timeout=timeout)
                status = "200"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            return loadgen.Sample(scheduled, time.perf_counter(), status)

        await asyncio.gather(*(call(time.perf_counter()) for _ in range(warmup * concurrency)))
        start = time.perf_counter()
        deadline, budget = start + max_seconds, iter(range(max_requests))

        async def worker() -> None:
            while next(budget, None) is not None and time.perf_counter() < deadline:
                samples.append(await call(time.perf_counter()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return loadgen.LoadResult(label, "closed", concurrency, 1, duration, samples)


def _step(target: tuple, concurrency: int, config: GrpcBenchConfig) -> dict:
    kind, label, where, payload = target
    bounds = {"max_requests": config.step_requests, "max_seconds": config.step_seconds}
    if kind == "rest":
        result = asyncio.run(loadgen.closed_loop(payload, concurrency, **bounds))
    else:
        result = asyncio.run(closed_loop_grpc(where, payload, concurrency, label=label, **bounds))
    return {**result.to_dict(), "label": label}


def _rounds(targets: list[tuple], config: GrpcBenchConfig) -> list[dict]:
    rows = []
    for round_ in range(config.rounds):
        order = targets[round_ % len(targets):] + targets[:round_ % len(targets)]  # A B C, B C A, ...
        for concurrency in config.concurrencies:
            for target in order:
                row = {"round": round_, **_step(target, concurrency, config)}
                rows.append(row)
                log.info("round %d c%d %s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, codes %s", round_, concurrency,
                         row["label"], row["throughput_rps"], row["p50_ms"], row["p99_ms"], row["codes"])
    return rows


def summarize_rounds(rows: list[dict], concurrencies: tuple[int, ...]) -> dict:
    """Per concurrency: each target's medians over rounds, and within-round comparisons with REST binary."""
    out = {}
    for c in concurrencies:
        at = [r for r in rows if r["level"] == c]
        medians = medians_by_label(at)
        by_round: dict[int, dict[str, dict]] = {}
        for r in at:
            by_round.setdefault(r["round"], {})[r["label"]] = r
        paired = [rs for rs in by_round.values() if REST in rs and GRPC in rs]
        diffs = [rs[GRPC]["p50_ms"] - rs[REST]["p50_ms"] for rs in paired]
        ratios = [rs[GRPC]["throughput_rps"] / rs[REST]["throughput_rps"] for rs in paired if rs[REST]["throughput_rps"]]
        out[str(c)] = {"medians": medians,
                       "grpc_minus_rest_p50_ms": {"median": statistics.median(diffs), "rounds": diffs} if diffs else None,
                       "grpc_over_rest_rps": {"median": statistics.median(ratios), "rounds": ratios} if ratios else None}
    return out


def run(repo: Path, config: GrpcBenchConfig) -> dict:
    from service.settings import Settings

    started, load_at_start, wall = datetime.now(timezone.utc), os.getloadavg(), time.perf_counter()
    manifest, _ = engines.open_model(Path(repo), config.model)
    specs = input_specs(manifest, 128)
    inputs = random_inputs(specs, 1, seed=1)
    defaults = {name: Settings.model_fields[name].default for name in ("max_batch_size", "max_queue_delay_ms")}
    _, _, _, paths = engines.open_variant(Path(repo), config.model, manifest.default_variant, benchmark=True)
    serve_repo = _serve_repo(Path(repo), config.model, config.log_dir.parent)
    common = {"log_dir": config.log_dir, "model": config.model, "threads": config.threads, **defaults}
    result = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "model": config.model,
              "variant": manifest.default_variant, "server_settings": defaults, "skipped": {},
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()}}
    with contextlib.ExitStack() as stack:
        normfuse = stack.enter_context(launch.start("normfuse", repo=str(serve_repo),
                                                    env={"NORMFUSE_LOG_LEVEL": "warning"}, **common))
        targets = [("rest", REST, None, loadgen.make_target(normfuse.base_url, config.model, specs, binary=True,
                                                            label=REST)),
                   ("grpc", GRPC, normfuse.grpc_address, grpc_request(config.model, inputs))]
        if config.triton:
            try:
                peer = stack.enter_context(launch.start("triton", onnx=str(paths["onnx"]), **common))
                targets.append(("grpc", TRITON, peer.grpc_address, grpc_request(config.model, inputs)))
            except (RuntimeError, TimeoutError, OSError) as exc:
                result["skipped"]["triton"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("Triton skipped: %s", exc)
        result["rows"] = _rounds(targets, config)
    result["summary"] = summarize_rounds(result["rows"], config.concurrencies)
    result["machine"], result["load_at_end"] = machine(load_at_start), list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall
    return result
