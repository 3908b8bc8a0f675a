"""`normfuse bench capacity`: one replica's latency curve, the model fitted to it, checked against two replicas.

For the baseline (`unfused`) and one fused variant, served by the same `normfuse serve` processes
(each with NORMFUSE_INTRA_OP_THREADS=1 and, when the machine allows, pinned to its own core):

1. one process: closed-loop saturation throughput μ in interleaved rounds (A B, B A, …; the rounds
   give μ's bootstrap interval), then open-loop Poisson sweeps at fractions of the
   baseline's μ, both variants at the same offered rates;
2. the model (capacity_model) fitted per variant to the one-process p99 points (μ and base; the closed-loop
   μ is kept beside it as a check);
3. two processes, the load generator picking one at random per request (as kube-proxy does): the same
   saturation rounds and the same sweep at twice the rates, compared with what the model predicts
   for two replicas — p99 at each rate, the largest rate meeting the SLO, and saturation throughput.

The load generator runs on the same cores as the servers; the CPU it and each server used is recorded
per step, so the report can say how much of the machine the client took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import engines
from benchmarks import loadgen
from benchmarks.capacity_model import (
    QueueFit,
    fit_queue,
    fleet_table,
    mm1_queue_length,
    mm1_wait_quantile,
    utilisation_where,
)
from benchmarks.engines_bench import input_specs
from benchmarks.peers import launch
from oip.stats import bootstrap, interleave

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapacityConfig:
    model: str = "vit-digits"
    fused: str | None = None           # None: the manifest's default if fused, else rmsnorm, else any servable
    baseline: str = "unfused"
    processes: tuple[int, ...] = (1, 2)
    threads: int = 1                   # NORMFUSE_INTRA_OP_THREADS per process: one replica = one core
    pin: bool = True                   # pin process i to core i (sched_setaffinity on every thread)
    max_batch_size: int = 16
    max_queue_delay_ms: float = 0.0    # opportunistic batching, as in `bench serving`
    saturation_concurrency: int = 32   # closed loop, split evenly over the processes
    saturation_rounds: int = 8         # per variant, interleaved
    saturation_step_s: float = 1.5
    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9)  # of one process's baseline μ, per process
    open_step_s: float = 5.0
    open_timeout_s: float = 10.0
    slo_ms: float = 10.0               # the local check: the largest rate whose p99 meets it
    fleet_rates: tuple[float, ...] = (1_000.0, 10_000.0, 100_000.0)
    fleet_slos_ms: tuple[float, ...] = (10.0, 50.0)
    util_cap: float = 0.8
    spare: int = 1                     # N+1 for a disruption budget
    hpa_queue_depth: float = 3.0       # deploy/k8s/base/hpa.yaml's per-pod targets, in model terms in the report
    hpa_queue_p95_ms: float = 8.0      # the model's wait; hpa.yaml adds the 2 ms batching window (a test checks)
    seq_len: int = 128
    log_dir: Path = field(default=Path(".bench/logs"))


def pick_variants(manifest, fused: str | None, baseline: str) -> tuple[str, str]:
    """(fused variant, why it was chosen)."""
    servable = manifest.servable()
    if baseline not in servable:
        raise ValueError(f"baseline variant {baseline!r} is not servable in {manifest.name}: {servable}")
    if fused:
        if fused not in servable or fused == baseline:
            raise ValueError(f"fused variant {fused!r} must be servable and not {baseline!r}: {servable}")
        return fused, "chosen on the command line"
    if manifest.default_variant != baseline:
        return manifest.default_variant, "the manifest's default variant"
    others = [v for v in servable if v != baseline]
    if not others:
        raise ValueError(f"{manifest.name} has no servable variant besides {baseline!r}")
    chosen = "rmsnorm" if "rmsnorm" in others else others[0]
    return chosen, (f"the manifest's default is {baseline!r} (no variant was reliably faster at convert time); "
                    f"{chosen!r} is measured as the fused variant")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cores_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process, the kernel), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


@contextlib.contextmanager
def cpu_meter(pids: Sequence[int]) -> Iterator[dict]:
    """Fills in the cores used over the block: by this process (the client), by each server, by the machine."""
    usage: dict = {}
    wall, own, machine = time.perf_counter(), time.process_time(), busy_cores_seconds()
    servers = [cpu_seconds(p) for p in pids]
    yield usage
    wall = time.perf_counter() - wall
    usage["client_cores"] = (time.process_time() - own) / wall
    usage["server_cores"] = [(cpu_seconds(p) - s) / wall for p, s in zip(pids, servers, strict=True)]
    usage["machine_cores"] = (busy_cores_seconds() - machine) / wall


def pin(pid: int, core: int) -> bool:
    """Pin every thread of `pid` to `core`; threads it starts later inherit it. False where not allowed."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {core})
    except OSError as exc:
        log.warning("could not pin pid %d to core %d: %s", pid, core, exc)
        return False
    return True


async def closed_spread(targets: Sequence[loadgen.Target], concurrency: int, seconds: float,
                        timeout: float) -> tuple[float, int]:
    """Closed loop split evenly over the targets: (successful req/s, non-200 count)."""
    per = max(1, concurrency // len(targets))
    results = await asyncio.gather(*(loadgen.closed_loop(t, per, max_requests=10**8, max_seconds=seconds,
                                                         timeout=timeout) for t in targets))
    ok = sum(len(r.ok) for r in results)
    return ok / max(r.duration_s for r in results), sum(len(r.samples) for r in results) - ok


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The client's garbage collector off for one step (collected before), so its pauses are not latency."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def serve_repo(repo: Path, model: str) -> Iterator[Path]:
    """A temporary repository holding only `model` (a symlink), so the servers load nothing else."""
    with tempfile.TemporaryDirectory(prefix="normfuse-capacity-") as work:
        (Path(work) / model).symlink_to((repo / model).resolve(), target_is_directory=True)
        yield Path(work)


@contextlib.contextmanager
def servers(repo: Path, n: int, config: CapacityConfig, warmup: str) -> Iterator[tuple[list, list[bool]]]:
    cores = sorted(os.sched_getaffinity(0))
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(launch.start(
            "normfuse", log_dir=config.log_dir, repo=str(repo), threads=config.threads,
            max_batch_size=config.max_batch_size, max_queue_delay_ms=config.max_queue_delay_ms,
            env={"NORMFUSE_LOG_LEVEL": "warning", "NORMFUSE_WARMUP_BATCH_SIZES": warmup})) for _ in range(n)]
        pinned = [pin(s.process.pid, cores[i % len(cores)]) if config.pin else False for i, s in enumerate(started)]
        yield started, pinned


def measure(repo: Path, n: int, config: CapacityConfig, variants: list[str], specs: list[dict],
            rates: Sequence[float] | None, warmup: str) -> tuple[list[dict], list[dict], list[float]]:
    """n processes: saturation rounds, then the open sweep at n × each per-process rate.

    `rates` None: the per-process rates are config.fractions of this run's baseline μ per process.
    Returns (saturation rows, sweep rows, the per-process rates used)."""
    saturation, sweep = [], []
    with servers(repo, n, config, warmup) as (started, pinned):
        pids = [s.process.pid for s in started]
        targets = {v: [loadgen.make_target(s.base_url, config.model, specs, version=v, binary=True, label=v)
                       for s in started] for v in variants}
        for round_index, order in enumerate(interleave(variants, config.saturation_rounds)):
            for v in order:
                with cpu_meter(pids) as cpu, no_gc():
                    rps, errors = asyncio.run(closed_spread(targets[v], config.saturation_concurrency,
                                                            config.saturation_step_s, config.open_timeout_s))
                saturation.append({"processes": n, "variant": v, "round": round_index, "rps": rps,
                                   "errors": errors, "pinned": all(pinned), **cpu})
        if rates is None:
            mu = float(np.median([r["rps"] for r in saturation if r["variant"] == variants[0]])) / n
            rates = [f * mu for f in config.fractions]
        for i, (per_process, order) in enumerate(zip(rates, interleave(variants, len(rates)), strict=True)):
            for v in order:
                with cpu_meter(pids) as cpu, no_gc():
                    rate = n * per_process  # spread at random over the n processes, as kube-proxy does
                    result = asyncio.run(loadgen.open_loop(targets[v], rate, max_requests=int(rate * config.open_step_s * 2) + 10,
                                                           max_seconds=config.open_step_s,
                                                           timeout=config.open_timeout_s, seed=i))
                row, lags = result.to_dict(), result.send_lags
                cpu["send_lag_p99_ms"] = float(np.percentile(lags, 99)) * 1e3 if lags else math.nan
                sweep.append({"processes": n, "variant": v, "per_process_rate": per_process, "pinned": all(pinned),
                              **{k: row[k] for k in ("level", "sent", "ok", "codes", "throughput_rps", "p50_ms",
                                                     "p90_ms", "p99_ms")}, **cpu})
                log.info("%d proc %s: offered %.0f req/s achieved %.0f p50 %.2f p99 %.2f ms client %.2f cores",
                         n, v, row["level"], row["throughput_rps"], row["p50_ms"], row["p99_ms"],
                         cpu["client_cores"])
    return saturation, sweep, list(rates)


def run(repo: Path, config: CapacityConfig) -> dict:
    from benchmarks.report import machine

    repo, load_at_start, started = Path(repo), os.getloadavg(), time.time()
    manifest, _ = engines.open_model(repo, config.model)
    fused, why = pick_variants(manifest, config.fused, config.baseline)
    specs = input_specs(manifest, config.seq_len)
    cap = min(config.max_batch_size, manifest.max_batch_size or config.max_batch_size)
    warmup = ",".join(str(2**i) for i in range(cap.bit_length()) if 2**i <= cap)
    saturation, sweep, rates = [], [], None
    with serve_repo(repo, config.model) as only_model:
        for n in config.processes:  # the first topology sets the sweep's per-process rates
            rounds, rows, rates = measure(only_model, n, config, [config.baseline, fused], specs, rates, warmup)
            saturation += rounds
            sweep += rows
    result = {"model": config.model, "baseline": config.baseline, "fused": fused, "fused_why": why,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "wall_s": round(time.time() - started, 1), "machine": machine(load_at_start),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
              "saturation": saturation, "sweep": sweep}
    return result | analyse(result)


def _median_ci(values: Sequence[float]) -> dict:
    interval = bootstrap(lambda a: float(np.median(a)), values, paired=False)
    return {"median": interval.estimate, "low": interval.low, "high": interval.high, "rounds": len(values)}


def max_rate_meeting(rows: Sequence[dict], slo_ms: float) -> dict:
    """The largest offered rate of a sweep whose p99 meets the SLO (every request answered 200): linear
    in p99 between the last point that meets it and the first that does not."""
    last = None
    for row in sorted(rows, key=lambda r: r["level"]):
        clean = row["ok"] == row["sent"] and math.isfinite(row["p99_ms"])
        if clean and row["p99_ms"] <= slo_ms:
            last = row
            continue
        if last is None:
            return {"rate": 0.0, "bound": f"below {row['level']:.0f}"}
        if not clean:
            return {"rate": last["level"], "bound": "at least"}
        share = (slo_ms - last["p99_ms"]) / (row["p99_ms"] - last["p99_ms"])
        return {"rate": last["level"] + share * (row["level"] - last["level"]), "bound": "interpolated"}
    return {"rate": last["level"] if last else 0.0, "bound": "at least"}


def analyse(result: dict) -> dict:
    """Fits, μ with intervals, model vs measurement and the fleet table, from the raw rows of `run`.

    Per variant the p99 model (κ = 1; μ and base fitted) comes from the one-process sweep. For n
    processes it predicts p99(λ/n) — each process a replica with a core of its own — and, as a second
    line, with each replica's μ scaled by the CPU share its process actually got at saturation."""
    config, base, fused = result["config"], result["baseline"], result["fused"]
    variants, slo = [base, fused], config["slo_ms"]
    one = min(config["processes"])
    sat = {(n, v): [r for r in result["saturation"] if (r["processes"], r["variant"]) == (n, v)]
           for n in config["processes"] for v in variants}
    rps = {key: [r["rps"] for r in rows] for key, rows in sat.items()}
    cores = {key: float(np.mean([np.mean(r["server_cores"]) for r in rows])) for key, rows in sat.items()}
    closed = {v: _median_ci(rps[one, v]) for v in variants}
    ratio = bootstrap(lambda u, f: float(np.median(f) / np.median(u)), rps[one, base], rps[one, fused])
    fits = {}
    for v in variants:
        rows = [r for r in result["sweep"] if (r["processes"], r["variant"]) == (one, v) and r["ok"] == r["sent"]]
        fits[v] = fit_queue([(r["level"] / one, r["p99_ms"] / 1e3) for r in rows],
                            mu_hint=closed[v]["median"] / one)
    share = {(n, v): cores[n, v] / cores[one, v] for n, v in sat}
    single = {(r["variant"], r["per_process_rate"]): r["p99_ms"] for r in result["sweep"] if r["processes"] == one}
    for row in result["sweep"]:
        n, fit = row["processes"], fits[row["variant"]]
        row["one_process_p99_ms"] = single.get((row["variant"], row["per_process_rate"]), math.nan)
        row["model_p99_ms"] = fit.latency(row["level"] / n) * 1e3
        row["model_cpu_p99_ms"] = fit.with_mu(fit.mu * min(1.0, share[n, row["variant"]])).latency(row["level"] / n) * 1e3
    checks = []
    for n in config["processes"]:
        for v in variants:
            rows = [r for r in result["sweep"] if (r["processes"], r["variant"]) == (n, v)]
            measured = max_rate_meeting(rows, slo)
            errors = [r["p99_ms"] / r["model_p99_ms"] - 1 for r in rows
                      if r["ok"] == r["sent"] and math.isfinite(r["model_p99_ms"])]
            cpu_fit = fits[v].with_mu(fits[v].mu * min(1.0, share[n, v]))
            checks.append({
                "processes": n, "variant": v, "slo_ms": slo,
                "saturation_rps": float(np.median(rps[n, v])), "saturation_model_rps": n * closed[v]["median"] / one,
                "server_cores": cores[n, v], "cpu_share": share[n, v],
                "saturation_client_cores": float(np.mean([r["client_cores"] for r in sat[n, v]])),
                "max_rate_measured": measured["rate"], "max_rate_bound": measured["bound"],
                "max_rate_model": n * fits[v].max_rate(slo / 1e3), "max_rate_model_cpu": n * cpu_fit.max_rate(slo / 1e3),
                "p99_error_median_pct": 100 * float(np.median(errors)) if errors else math.nan,
                "client_cores": float(np.mean([r["client_cores"] for r in rows])) if rows else math.nan})
    # the fitted μ inherits the relative spread of the closed-loop rounds (the only repeated measurement of μ)
    intervals = {v: (fits[v].mu * closed[v]["low"] / closed[v]["median"],
                     fits[v].mu * closed[v]["high"] / closed[v]["median"]) for v in variants}
    fleet = fleet_table(fits, config["fleet_rates"], [s / 1e3 for s in config["fleet_slos_ms"]], baseline=base,
                        util_cap=config["util_cap"], spare=config["spare"], mu_intervals=intervals)
    return {"closed_mu": closed, "closed_mu_ratio": {"estimate": ratio.estimate, "low": ratio.low, "high": ratio.high},
            "fits": {v: f.to_dict() | {"mu_low": intervals[v][0], "mu_high": intervals[v][1]} for v, f in fits.items()},
            "checks": checks, "fleet": fleet, "hpa": {v: hpa_equivalents(f, config) for v, f in fits.items()},
            "load_at_end": list(os.getloadavg())}


def hpa_equivalents(fit: QueueFit, config: dict) -> dict:
    """Where the HPA's per-pod targets sit on this replica's M/M/1 curve: the utilisation (and rate) at which
    the mean queue depth, and the p95 queue wait, reach their targets, and the p99 predicted there."""
    wait = config["hpa_queue_p95_ms"] / 1e3
    rows = {"queue_depth": utilisation_where(mm1_queue_length, config["hpa_queue_depth"]),
            "queue_p95": utilisation_where(lambda rho: mm1_wait_quantile(rho * fit.mu, fit.mu, 0.95), wait)}
    return {name: {"utilisation": rho, "rate": rho * fit.mu, "p99_ms": fit.latency(rho * fit.mu) * 1e3}
            for name, rho in rows.items()}
