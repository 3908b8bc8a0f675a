"""`normfuse bench plans`: every plan ÷ ORT fp32 `unfused` and ÷ OpenVINO's default compile, on this CPU.

Per model × thread count × batch size, every plan (benchmarks/plans.py) runs interleaved with the others on one
input batch, the order rotated each round (oip.stats); a timed sample is enough back-to-back calls to last
`min_sample_s`. Reported per plan: the median, its speed-up over ORT fp32 `unfused` and over OpenVINO's default
compile of the unfused file (ratios of medians, paired bootstrap 95% intervals), the achieved GFLOP/s (the
unfused graph's MatMul/Gemm/Conv FLOPs, benchmarks/onnx_flops.py) and its fraction of the peak of the unit the
plan's precision runs on (benchmarks/cpu_peak.py), and the rel-L2 of its output against ORT fp32 `unfused`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS = Path("benchmarks/results/plans.json")


@dataclass(frozen=True)
class PlansConfig:
    models: tuple[str, ...] = ("vit-s16", "gpt2-small", "all-minilm-l6-v2", "vit-digits")
    plans: tuple = ()                       # Plan objects; () = plans.DEFAULT_PLANS
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] = (1, 0)       # 0 = all cores (each engine's default)
    seq_len: int = 128
    rounds: int = 6
    min_rounds: int = 3
    max_seconds: float = 90.0               # per model × threads × batch size
    min_sample_s: float = 0.05
    calibration: int = 8                    # NNCF calibration inputs (batch 1 each)

    def __post_init__(self) -> None:
        if self.min_rounds < 2 or self.rounds < self.min_rounds:
            raise ValueError(f"need rounds >= min_rounds >= 2, got {self.rounds}, {self.min_rounds}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or min(self.threads, default=0) < 0:
            raise ValueError(f"batch sizes must be >= 1 and threads >= 0, got {self.batch_sizes}, {self.threads}")


def measure_group(loaded: dict, inputs: dict, config: PlansConfig) -> dict[str, list[float]]:
    """Interleaved samples (seconds per call) of every loaded plan on `inputs`."""
    from benchmarks.plans import BASELINE, time_plan
    from oip.stats import interleave

    for plan in loaded.values():
        plan.infer(inputs)  # warm-up
    base = loaded.get(BASELINE.name) or next(iter(loaded.values()))
    calls = max(1, math.ceil(config.min_sample_s / max(time_plan(base, inputs), 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in loaded}
    deadline = time.perf_counter() + config.max_seconds
    for r, order in enumerate(interleave(list(loaded), config.rounds)):
        if r >= config.min_rounds and time.perf_counter() > deadline:
            break
        for name in order:
            times[name].append(time_plan(loaded[name], inputs, calls))
    return times


def rows_for(model: str, threads: int, batch: int, times: dict, loaded: dict, errors: dict, flops,
             cpu) -> list[dict]:
    from benchmarks.cpu_peak import peak_gflops
    from benchmarks.plans import BASELINE, PEER
    from oip.stats import ratio_ci, summarize

    cores = threads or os.cpu_count() or 1
    rows = []
    for name, samples in times.items():
        s, plan = summarize(samples), loaded[name]
        row = {"model": model, "threads": threads, "cores": cores, "batch": batch, "plan": name,
               "variant": plan.plan.variant, "engine": plan.plan.engine, "precision": plan.precision,
               "rounds": s.n, "p50_ms": s.median * 1e3, "p99_ms": s.p99 * 1e3, "rel_l2": errors.get(name)}
        for key, ref in (("vs_ort", BASELINE.name), ("vs_ov", PEER.name)):
            if ref in times:  # speed-up = median(ref) / median(plan), paired over rounds
                ci = ratio_ci(samples, times[ref])
                row.update({key: ci.estimate, f"{key}_low": ci.low, f"{key}_high": ci.high})
        if flops is not None and flops.complete and s.median > 0:
            unit, peak = peak_gflops(cpu, _peak_precision(plan.precision), cores)
            row.update(gflops=flops.flops / s.median / 1e9, unit=unit, peak_gflops=peak)
            row["peak_fraction"] = row["gflops"] / peak if peak else None
        rows.append(row)
    return rows


def _peak_precision(precision: str) -> str:
    return "int8" if precision.startswith("int8") else "bf16" if "bf16" in precision else "fp32"


def rel_l2(output, reference) -> float:
    import numpy as np

    ref = reference.astype(np.float64)
    return float(np.linalg.norm(output.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def batch_flops(path: Path, specs: list[dict], batch: int):
    """FLOPs at `batch`, counted at batch ≥ 2 and scaled: every matrix product here is linear in the batch, and
    shape inference leaves some of an HF export's shapes symbolic at batch 1 (a squeezable axis)."""
    from benchmarks.onnx_flops import FlopCount, count_flops

    counted = max(batch, 2)
    found = count_flops(path, {s["name"]: [counted] + s["shape"][1:] for s in specs})
    return FlopCount(found.flops * batch // counted, found.counted, found.unresolved)


def bench_model(model_dir: Path, config: PlansConfig, cpu, notes: list[str]) -> list[dict]:
    from benchmarks.inputs import random_inputs
    from benchmarks.plans import BASELINE, DEFAULT_PLANS, load_plan
    from benchmarks.plans_models import input_specs, onnx_files, unservable

    name, files = model_dir.name, onnx_files(model_dir)
    notes += [f"{name}: `{variant}` failed its accuracy gate at conversion ({why}): timed for speed, not served"
              for variant, why in unservable(model_dir).items()]
    plans = [p for p in (config.plans or DEFAULT_PLANS) if p.variant in files]
    notes += [f"{name}: plan {p.name} not run: the conversion built no `{p.variant}` variant"
              for p in (config.plans or DEFAULT_PLANS) if p.variant not in files]
    specs = input_specs(model_dir, config.seq_len)
    calibration = [random_inputs(specs, 1, seed=1000 + i) for i in range(config.calibration)]
    flops = {batch: batch_flops(files[BASELINE.variant], specs, batch) for batch in config.batch_sizes}
    notes += [f"{name} b{batch}: {f.unresolved} matrix products without static shapes; no GFLOP/s"
              for batch, f in flops.items() if not f.complete]
    quantized, rows = {}, []
    for threads in config.threads:
        loaded = {}
        for plan in plans:
            try:
                loaded[plan.name] = load_plan(plan, files[plan.variant], threads, calibration, quantized)
            except Exception as exc:  # noqa: BLE001 - a plan that cannot load is a row of the notes, not a crash
                log.exception("%s: plan %s did not load", name, plan.name)
                notes.append(f"{name}: plan {plan.name} did not load: {type(exc).__name__}: {str(exc)[:200]}")
        if BASELINE.name not in loaded:
            continue
        for batch in config.batch_sizes:
            inputs = random_inputs(specs, batch, seed=batch)
            reference = loaded[BASELINE.name].infer(inputs)[0]
            errors = {n: rel_l2(p.infer(inputs)[0], reference) for n, p in loaded.items()}
            times = measure_group(loaded, inputs, config)
            rows += rows_for(name, threads, batch, times, loaded, errors, flops[batch], cpu)
            log.info("%s t%d b%d: %s", name, threads, batch,
                     ", ".join(f"{n} {sorted(t)[len(t) // 2] * 1e3:.1f} ms" for n, t in times.items()))
        del loaded
    return rows


def run(repo: Path, work: Path, config: PlansConfig) -> dict:
    from benchmarks.cpu_peak import per_cycle, read_cpu
    from benchmarks.plans_models import convert_model, default_plan
    from benchmarks.report import machine

    load, started, clock = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    cpu, rows, notes, defaults = read_cpu(), [], [], {}
    for name in config.models:
        try:
            model_dir = convert_model(name, Path(repo), Path(work))
        except Exception as exc:  # noqa: BLE001 - report the others
            log.exception("could not convert %s", name)
            notes.append(f"{name}: not converted: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        try:
            defaults[name] = default_plan(model_dir)
        except Exception as exc:  # noqa: BLE001 - the table stands without it
            log.exception("%s: could not attach plans", name)
            notes.append(f"{name}: normfuse's default plan not determined: {type(exc).__name__}: {str(exc)[:200]}")
        rows += bench_model(model_dir, config, cpu, notes)
    settings = asdict(config) | {"plans": [p.name for p in config.plans]}
    return {"started": started, "wall_s": time.perf_counter() - clock, "config": settings, "rows": rows,
            "notes": notes, "defaults": defaults, "cpu": {**asdict(cpu), "flags": sorted(cpu.flags), "describe": cpu.describe(),
                                    "per_cycle": per_cycle(cpu)},
            "machine": machine(load), "versions": _versions()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for package in ("onnxruntime", "openvino", "nncf", "torch"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


# ----------------------------------------------------------------------------- command line

def register(modes) -> None:
    """`normfuse bench plans` (benchmarks.cli registers it; heavy imports happen in main)."""
    p = modes.add_parser("plans", help="every plan (variant × engine × precision) ÷ ORT fp32 unfused and ÷ "
                         "OpenVINO's default compile, batch 1/8, 1 thread/all, with GFLOP/s and the fraction of peak")
    p.add_argument("--repo", type=Path, default=Path(".bench/plans-repo"), help="where the models are converted")
    p.add_argument("--work", type=Path, default=Path(".bench"), help="where HF source directories are built")
    p.add_argument("--models", default=None, help="comma list (default: vit-s16,gpt2-small,all-minilm-l6-v2,"
                   "vit-digits; a name already in --repo is benchmarked as converted)")
    p.add_argument("--plans", default=None, help="comma list of VARIANT/ENGINE/PRECISION (default: the 8 of "
                   "benchmarks/plans.py)")
    p.add_argument("--batch-sizes", default=None, help="default 1,8")
    p.add_argument("--threads", default=None, help="comma list; 0 = all cores (default 1,0)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
    p.add_argument("--quick", action="store_true", help="2 rounds, short samples: a smoke run, not numbers")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--plots", type=Path, default=Path("benchmarks/plots"))
    p.add_argument("--render", action="store_true", help="measure nothing: render the section from --json")
    p.add_argument("--served", default="vit-s16", help="model whose served figures (normfuse serve defaults, c=1 "
                   "and c=32, REST binary and gRPC) go beside the raw engine ('' = none; default vit-s16)")
    p.add_argument("--served-only", action="store_true", help="measure only the served figures and add them to "
                   "--json's results")
    p.set_defaults(handler=main)


def config_from(args) -> PlansConfig:
    from benchmarks.plans import Plan

    def names(text):
        return tuple(x for x in text.split(",") if x) if text else None

    given = {"models": names(args.models), "plans": tuple(Plan.parse(x) for x in names(args.plans) or ()),
             "batch_sizes": tuple(int(x) for x in names(args.batch_sizes) or ()),
             "threads": tuple(int(x) for x in names(args.threads) or ()), "rounds": args.rounds}
    quick = {"rounds": 2, "min_rounds": 2, "min_sample_s": 0.005, "max_seconds": 5.0, "calibration": 2} \
        if args.quick else {}
    base = PlansConfig(**quick)
    given = {k: v for k, v in given.items() if v}
    if "rounds" in given:
        given["min_rounds"] = min(base.min_rounds, given["rounds"])
    return replace(base, **given)


def main(args) -> int:
    import json

    from benchmarks import plans_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.render and not args.served_only:
        try:
            config = config_from(args)
        except ValueError as exc:
            sys.stderr.write(f"normfuse bench plans: {exc}\n")
            return 2
        result = run(args.repo, args.work, config)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.served and not args.render:
        from benchmarks import plans_served

        result = json.loads(args.json.read_text())
        steps = {"rounds": 1, "step_seconds": 1.0} if args.quick else {}
        result["served"] = plans_served.measure(args.repo, args.served, Path(args.work) / "logs", **steps)
        if result["served"]["backend"] == "openvino":  # the default hint's evidence, from this same run
            hint_steps = {"rounds": 2, "step_seconds": 0.5} if args.quick else {}
            result["served"]["hints"] = plans_served.compare_hints(args.repo, args.served,
                                                                   result["served"]["variant"], **hint_steps)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plans_report.write(args.out, json.loads(args.json.read_text()), plot_dir=args.plots)
    sys.stdout.write(f"wrote the CPU plans section of {args.out}\n")
    return 0
