"""What each `normfuse bench` / `loadgen` / `capacity` command does once its flags are parsed (benchmarks/cli.py).

Heavy imports happen inside the handlers, so registering the commands costs nothing."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


def run_int8(args) -> int:
    from benchmarks import int8_bench, int8_report

    _setup_logging()
    config = int8_bench.Int8BenchConfig(rounds=args.rounds, min_rounds=min(4, args.rounds),
                                        speed=not args.skip_speed, accuracy=not args.skip_accuracy)
    result = int8_bench.run(args.work, config)
    _dump(result, args.json)
    int8_report.write_int8(args.out, result, plot_dir=args.plots)
    return 0


def run_int8_report(args) -> int:
    from benchmarks import int8_report

    int8_report.write_int8(args.out, json.loads(args.results.read_text()), plot_dir=args.plots)
    sys.stdout.write(f"wrote the int8 section of {args.out}\n")
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _engine_config(args):
    from benchmarks.engines_bench import EngineBenchConfig

    quick = {"batch_sizes": (1, 4), "rounds": 4, "min_rounds": 2, "max_seconds": 10.0, "warmup": 1} if args.quick else {}
    given = {k: v for k, v in {"batch_sizes": args.batch_sizes, "rounds": args.rounds}.items() if v}
    return EngineBenchConfig(**(quick | given), threads=args.threads, backends=tuple(args.backends),
                             models=tuple(args.models) if args.models else None)


def _serving_config(args):
    from benchmarks.serving_bench import ServingBenchConfig

    quick = {"concurrencies": (1, 4), "batch_sizes": (1, 4), "step_seconds": 1.0, "step_requests": 200,
             "open_fractions": (0.5,), "engine_rounds": 5, "max_batch_size": 4} if args.quick else {}
    given = {"concurrencies": args.concurrency} if args.concurrency else {}
    return ServingBenchConfig(**(quick | given), model=args.serving_model, variant=args.serving_variant,
                              servers=tuple(args.servers), threads=args.threads,
                              max_queue_delay_ms=args.max_queue_delay_ms,
                              log_dir=Path(args.repo).parent / "logs")


def _capacity_config(args):
    from benchmarks.capacity_bench import CapacityConfig

    quick = {"saturation_concurrency": 4, "saturation_rounds": 2, "saturation_step_s": 0.4, "fractions": (0.3, 0.6),
             "open_step_s": 0.6, "open_timeout_s": 5.0, "max_batch_size": 4} if args.quick else {}
    given = {"fractions": args.fractions} if getattr(args, "fractions", None) else {}
    return CapacityConfig(**(quick | given), model=getattr(args, "model", None) or args.serving_model,
                          fused=getattr(args, "fused", None), threads=args.threads or 1,
                          slo_ms=getattr(args, "slo_ms", 10.0), pin=not getattr(args, "no_pin", False),
                          fleet_slos_ms=tuple(getattr(args, "fleet_slo_ms", (10.0, 50.0))),
                          fleet_rates=tuple(getattr(args, "fleet_rates", (1e3, 1e4, 1e5))),
                          log_dir=_log_dir(args.repo))


def _log_dir(repo: Path) -> Path:
    """Server logs beside the repository (.bench/repo -> .bench/logs), or under .bench/ for a repository in
    the working directory (model_repository), not loose in the source tree."""
    parent = Path(repo).resolve().parent
    return Path(".bench/logs") if parent == Path.cwd().resolve() else parent / "logs"


def _dump(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=1, default=str)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def run_engines(args) -> int:
    from benchmarks import engines_bench

    _setup_logging()
    _dump(engines_bench.run(args.repo, _engine_config(args)), args.json)
    return 0


def run_serving(args) -> int:
    from benchmarks import serving_bench

    _setup_logging()
    _dump(serving_bench.run(args.repo, _serving_config(args)), args.json)
    return 0


def run_capacity(args) -> int:
    from benchmarks import capacity_bench, report

    _setup_logging()
    _keep(capacity_bench.run(args.repo, _capacity_config(args)), args, "capacity", report.write_capacity)
    return 0


def run_reload(args) -> int:
    from benchmarks import reload_bench

    _setup_logging()
    if args.render is not None:
        _keep(json.loads(args.render.read_text()), args, "reload", reload_bench.write, dump=False)
        return 0
    if args.repo is None:
        sys.stderr.write("normfuse bench reload: --repo is required (or --render RESULTS)\n")
        return 2
    config = reload_bench.ReloadConfig(model=args.model, swaps=args.swaps, gap_s=args.gap_s, poll_s=args.poll_s,
                                       concurrency=args.concurrency, log_dir=_log_dir(args.repo))
    _keep(reload_bench.run(args.repo, config), args, "reload", reload_bench.write)
    return 0


def _keep(result: dict, args, name: str, write, dump: bool = True) -> None:
    """The results to --json (default NAME.json beside the server logs) unless not `dump` (a re-render); their
    section into --out, if given."""
    if dump:
        _dump(result, args.json or _log_dir(args.repo).parent / f"{name}.json")
    if args.out:
        write(args.out, result, plot_dir=args.plots)
        log.info("wrote the %s section of %s", name, args.out)


def run_overload(args) -> int:
    import dataclasses

    from benchmarks import overload_bench, overload_report

    if not args.report_only:
        if args.repo is None:
            sys.stderr.write("normfuse bench overload: --repo is required to measure (or --report-only)\n")
            return 2
        _setup_logging()
        config = overload_bench.OverloadConfig(model=args.model, log_dir=_log_dir(args.repo))
        if args.quick:
            config = dataclasses.replace(config, clients=32, flood_s=3, big_rows=256, capacity_s=2,
                                         unloaded_requests=30, triton_requests=30, window_rounds=1, window_s=1,
                                         engine_rounds=30)
        start = " ".join(f"{x:.2f}" for x in os.getloadavg())
        result = overload_bench.run(args.repo, config)
        result["load_start"], result["load_end"] = start, " ".join(f"{x:.2f}" for x in os.getloadavg())
        _dump(result, args.json)
    overload_report.write(args.out, json.loads(args.json.read_text()))
    sys.stdout.write(f"wrote the overload section of {args.out}\n")
    return 0


def run_capacity_plan(args) -> int:
    from benchmarks.capacity_model import InfeasibleSLO, QueueFit, fits_from_results, plan

    try:
        fits = ({"curve": QueueFit(mu=args.mu, base_s=args.base_ms / 1e3, kappa=args.kappa)} if args.mu
                else fits_from_results(json.loads(args.results.read_text())))
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"normfuse capacity plan: cannot read a curve: {exc}\n")
        return 2
    names = list(args.variants) or list(fits)
    unknown = [n for n in names if n not in fits]
    if unknown:
        sys.stderr.write(f"normfuse capacity plan: no curve for {unknown}; have {list(fits)}\n")
        return 2
    sys.stdout.write(f"p99 SLO {args.p99_ms:g} ms, utilisation cap {args.util_cap:g}, spare {args.spare}\n"
                     f"{'variant':>10} {'mu req/s':>9} {'base ms':>8} {'rate req/s':>11} {'replicas':>8} "
                     f"{'total':>6} {'util':>5} {'p99 ms':>7}  limited by\n")
    status = 0
    for name in names:
        fit = fits[name]
        for rate in args.rate:
            try:
                p = plan(rate, args.p99_ms / 1e3, fit, util_cap=args.util_cap, spare=args.spare)
            except InfeasibleSLO as exc:
                sys.stderr.write(f"{name}: {exc}\n")
                status = 3
                continue
            sys.stdout.write(f"{name:>10} {fit.mu:9.0f} {fit.base_s * 1e3:8.2f} {rate:11.0f} {p.replicas:8d} "
                             f"{p.total:6d} {p.utilisation:5.2f} {p.predicted_s * 1e3:7.2f}  {p.limited_by}\n")
    return status


def run_capacity_report(args) -> int:
    from benchmarks import report

    report.write_capacity(args.out, json.loads(args.results.read_text()), plot_dir=args.plots)
    sys.stdout.write(f"wrote the capacity section of {args.out}\n")
    return 0


def run_grpc(args) -> int:
    from benchmarks import grpc_bench, grpc_report

    _setup_logging()
    quick = {"rounds": 1, "step_seconds": 1.0, "step_requests": 300} if args.quick else {}
    config = grpc_bench.GrpcBenchConfig(**({"rounds": args.rounds, "step_seconds": args.step_seconds} | quick),
                                        model=args.model, concurrencies=tuple(args.concurrency),
                                        triton=not args.no_triton, threads=args.threads,
                                        log_dir=_log_dir(args.repo))
    _keep(grpc_bench.run(args.repo, config), args, "grpc", grpc_report.write_grpc)
    return 0


def run_grpc_report(args) -> int:
    from benchmarks import grpc_report

    grpc_report.write_grpc(args.out, json.loads(args.results.read_text()), plot_dir=args.plots)
    sys.stdout.write(f"wrote the gRPC section of {args.out}\n")
    return 0


def _stage(name: str, run, notes: list[str]):
    """run(); if it fails, the report says why and keeps what the other stages measured (None here)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - report what was measured rather than nothing
        log.exception("%s benchmark failed", name)
        notes.append(f"the {name} benchmark failed: {type(exc).__name__}: {exc}")
        return None


def run_all(args) -> int:
    """Every section of BENCHMARKS.md in one run on this machine: prepare the repository, measure the engines,
    serving, capacity and trained-in-norms sections here, then each other section in its own process
    (benchmarks/one_run.py); a section in --skip is rendered from its last results, which say their date."""
    import time

    from benchmarks import engines_bench, gpu_check_report, one_run, prepare, report, serving_bench
    from benchmarks.cpu_peak import read_cpu

    _setup_logging()
    unknown = set(args.skip) - set(one_run.NAMES)
    if unknown:
        sys.stderr.write(f"normfuse bench all: --skip names unknown sections {sorted(unknown)}; "
                         f"choose from {', '.join(one_run.NAMES)}\n")
        return 2
    started, load_at_start, clock = datetime.now(timezone.utc), os.getloadavg(), time.perf_counter()
    notes, status = [], {}
    if not args.no_prepare:
        wanted = list(args.models) if args.models else list(prepare.MODELS)
        ready = prepare.prepare(args.repo, Path(args.repo).parent, wanted, threads=args.threads,
                                reconvert=args.reconvert)
        notes += [f"model {m} could not be converted (see the log); not benchmarked" for m in wanted if m not in ready]
    results_path = args.json or Path(args.repo).parent / "results.json"

    def timed(name, measure):
        if name in args.skip:
            status[name] = "not measured (skipped)"
            return None
        began = time.perf_counter()
        result = _stage(name, measure, notes)
        status[name] = f"measured in {time.perf_counter() - began:.0f} s" if result is not None else "failed"
        return result

    engine_result = timed("engines", lambda: engines_bench.run(args.repo, _engine_config(args)))
    _dump({"engines": engine_result, "serving": None}, results_path)  # kept even if serving fails below
    serving_result = timed("serving", lambda: serving_bench.run(args.repo, _serving_config(args)))
    from benchmarks import capacity_bench, un_powernorm

    capacity = timed("capacity", lambda: capacity_bench.run(args.repo, _capacity_config(args)))
    if capacity is None and "capacity" in args.skip and args.capacity_results.is_file():
        capacity, status["capacity"] = json.loads(args.capacity_results.read_text()), "kept from its results file"
    _dump({"engines": engine_result, "serving": serving_result, "capacity": capacity}, results_path)
    # issue 7's table: LN / LN→rmsnorm / UN-folded / PN and the no-norm bound, trained models
    norms = timed("norms", lambda: un_powernorm.measure(rounds=10 if args.quick else 30,
                                                         iters=20 if args.quick else 50))
    command = "normfuse bench all " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "all"] else "make bench"
    report.write(args.out, engine_result, serving_result, plot_dir=args.plots, command=command, started=started,
                 notes=notes, load_at_start=load_at_start, norms=norms, capacity=capacity)
    status |= one_run.run_sections(args, notes)
    gpu_check_report.keep(args.out, plot_dir=args.plots)  # a GPU run's results, or the line saying there is none
    status["gpu-check"] = ("kept from its results file (a GPU machine)" if Path(
        "benchmarks/results/gpu_check.json").is_file() else "not measured: needs a CUDA GPU (`make gpu-check`)")
    one_run.put_header(args.out, one_run.header(command, started.strftime("%Y-%m-%d %H:%M UTC"),
                                                time.perf_counter() - clock, read_cpu().describe(), status))
    if notes:
        log.warning("notes: %s", "; ".join(notes))
    log.info("wrote %s", args.out)
    return 0


def run_loadgen(args) -> int:
    import asyncio

    from benchmarks import loadgen

    _setup_logging()
    metadata = asyncio.run(loadgen.fetch_metadata(args.url, args.model))
    specs = [{**t, "shape": [t["shape"][0]] + [args.seq_len if d < 0 else d for d in t["shape"][1:]]}
             for t in metadata["inputs"]]
    variants = list(metadata.get("versions") or [None]) if args.variants == ("all",) else list(args.variants or [None])
    results = []
    for variant in variants:
        target = loadgen.make_target(args.url, args.model, specs, version=variant, binary=args.protocol == "binary",
                                     batch=args.batch, label=variant or "default")
        bounds = {"max_requests": args.max_requests, "max_seconds": args.max_seconds, "timeout": args.timeout}
        for concurrency in args.concurrency:
            results.append(asyncio.run(loadgen.closed_loop(target, concurrency, **bounds)).to_dict())
        for rate in args.rates:
            results.append(asyncio.run(loadgen.open_loop(target, rate, **bounds)).to_dict())
    for r in results:
        sys.stdout.write(f"{r['label']:>12} {r['mode']:>6} {r['level']:>7g}  ok {r['ok']:>5}/{r['sent']:<5} "
                         f"{r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:8.2f}  p90 {r['p90_ms']:8.2f}  "
                         f"p99 {r['p99_ms']:8.2f} ms  codes {r['codes']}\n")
    if args.json:
        _dump({"url": args.url, "model": args.model, "protocol": args.protocol, "results": results}, args.json)
    return 0
