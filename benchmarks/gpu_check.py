"""`make gpu-check` / `normfuse bench gpu-check`: fused vs unfused vs UN-folded in torch on a GPU.

    python3 -m benchmarks.gpu_check                       # on a CUDA machine: the real run (≤ 8 min on one H100)
    python3 -m benchmarks.gpu_check --dry-run             # anywhere: tiny models, few rounds — the whole path
    python3 -m benchmarks.gpu_check --render RESULTS.json # re-render the BENCHMARKS.md section, no measuring

ViT-S/16 (224²) and GPT-2-small (sequence 128), random weights from their HF configs (benchmarks/gpu_models.py),
each as `unfused`, `affine`, `rmsnorm`, `un-folded` and the `nonorm` bound, in stages: eager fp32, eager bf16,
torch.compile bf16, torch.compile fp32 (in that order, so a budget that runs out drops the least telling one).
Per stage × model × batch size every variant runs interleaved (the order rotated each round, oip.stats); a timed
sample is enough back-to-back calls to last `min_sample_s`, timed with CUDA events (perf_counter on the CPU).
Each row has the median, the paired-bootstrap ratio to `unfused`, the gain captured of the no-norm bound, the
rel-L2 of its output against the fp32 eager reference, and (compiled stages) the first call's compile time.

With no CUDA device, or `--dry-run`, it runs tiny models (2 layers, width 32) for a few rounds — on the CPU with
torch.compile's `eager` backend (dynamo without inductor's C++ build) — so CI exercises every step; a dry run
writes `.bench/gpu_check_dry_run.{json,md}` unless told otherwise, never the committed figures.

Needs torch, transformers, numpy and matplotlib only (what the lent GPU image has): no pydantic, ONNX or server.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("eager-fp32", "eager-bf16", "compile-bf16", "compile-fp32")
MODELS = ("vit-s16", "gpt2-small")
RESULTS, OUT = Path("benchmarks/results/gpu_check.json"), Path("BENCHMARKS.md")
DRY_RESULTS, DRY_OUT = Path(".bench/gpu_check_dry_run.json"), Path(".bench/gpu_check_dry_run.md")


@dataclass(frozen=True)
class GpuCheckConfig:
    device: str = "cuda"
    dry_run: bool = False
    models: tuple[str, ...] = MODELS
    stages: tuple[str, ...] = STAGES
    batch_sizes: tuple[int, ...] = (1, 32)  # b1: launch-bound, where norm kernels count most; b32: compute-bound
    seq_len: int = 128
    rounds: int = 20
    min_rounds: int = 5
    warmup: int = 3
    min_sample_s: float = 0.01             # one sample = enough calls to last this long (≥ 10 ms of GPU time)
    max_seconds: float = 20.0              # per stage × model × batch size
    budget_s: float = 390.0                # the whole run (≤ 8 min with start-up and one compile running over)
    compile_reserve_s: float = 90.0        # a compiled stage × model starts only with this much budget left
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES] + [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown stage or model {unknown}; stages: {', '.join(STAGES)}; models: "
                             f"{', '.join(MODELS)}")
        if self.min_rounds < 2 or self.rounds < self.min_rounds:
            raise ValueError(f"need rounds >= min_rounds >= 2, got rounds={self.rounds}, min_rounds={self.min_rounds}")


def dry_run_config(device: str) -> GpuCheckConfig:
    """Tiny models, one small batch size, a few rounds: seconds on 2 CPU cores."""
    return GpuCheckConfig(device=device, dry_run=True, batch_sizes=(2,), seq_len=16, rounds=3, min_rounds=2,
                          warmup=1, min_sample_s=0.0, max_seconds=5.0, budget_s=120.0, compile_reserve_s=0.0,
                          compile_backend="inductor" if device == "cuda" else "eager")


# ----------------------------------------------------------------------------- timing

def timed(run, calls: int, device) -> float:
    """Seconds per call of `calls` back-to-back calls: CUDA events around them on a GPU, perf_counter on a CPU."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - begin) / calls


def interleaved(runners: dict, config: GpuCheckConfig, device) -> dict[str, list[float]]:
    """Rounds of every runner once, the order rotated each round; stops after min_rounds once time runs out."""
    from oip.stats import interleave

    once = timed(runners["unfused"], 1, device)
    calls = max(1, math.ceil(config.min_sample_s / max(once, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    deadline = time.perf_counter() + config.max_seconds
    for r, order in enumerate(interleave(list(runners), config.rounds)):
        if r >= config.min_rounds and time.perf_counter() > deadline:
            break
        for name in order:
            times[name].append(timed(runners[name], calls, device))
    return times


def rows_for(model: str, stage: str, batch: int, times: dict[str, list[float]], extra: dict[str, dict]) -> list[dict]:
    from benchmarks.gpu_models import EXACT
    from oip.stats import gain_captured_ci, ratio_ci, summarize

    rows = []
    for variant, samples in times.items():
        s = summarize(samples)
        row = {"model": model, "stage": stage, "batch": batch, "variant": variant, "exact": EXACT[variant],
               "rounds": s.n, "p50_ms": s.median * 1e3, "p99_ms": s.p99 * 1e3, **extra.get(variant, {})}
        ci = ratio_ci(times["unfused"], samples)
        row.update(ratio=ci.estimate, ratio_low=ci.low, ratio_high=ci.high)
        if "nonorm" in times and variant not in ("unfused", "nonorm"):
            gain = gain_captured_ci(times["unfused"], samples, times["nonorm"])
            row.update(gain=gain.estimate, gain_low=gain.low, gain_high=gain.high)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one stage of one model

def rel_l2(output, reference) -> float:
    diff = output.float() - reference
    return float(diff.norm() / reference.norm())


def stage_modules(variants: dict, stage: str, config: GpuCheckConfig) -> dict:
    """The variants as this stage runs them: cast to bf16 (a copy) and/or wrapped by torch.compile."""
    import torch

    mode, dtype = stage.split("-")
    out = {name: copy.deepcopy(m).to(torch.bfloat16) if dtype == "bf16" else m for name, m in variants.items()}
    if mode == "compile":
        out = {name: torch.compile(m, backend=config.compile_backend, dynamic=False) for name, m in out.items()}
    return out


def first_call(label: str, module, inputs: dict, reference, compiled: bool, config: GpuCheckConfig, device,
               notes: list[str]):
    """(runner, row extras) after the first call (where a compiled stage compiles) and the warm-up; None, with a
    note, when the variant fails (one variant that does not compile must not sink the run)."""
    import torch

    start = time.perf_counter()
    try:
        output = module(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported in the section, the other variants still run
        notes.append(f"{label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        log.exception("%s failed", label)
        return None
    extra = {"rel_l2": rel_l2(output, reference), **({"compile_s": time.perf_counter() - start} if compiled else {})}
    runner = lambda m=module, x=inputs: m(**x)  # noqa: E731 - bound per variant
    for _ in range(config.warmup):
        runner()
    return runner, extra


def run_stage(spec, stage: str, variants: dict, references: dict, config: GpuCheckConfig, device,
              notes: list[str], deadline: float) -> list[dict]:
    """Every batch size of one stage of one model, all variants interleaved; past the deadline no further batch
    size starts and no further variant compiles."""
    import torch

    modules, rows, compiled = stage_modules(variants, stage, config), [], stage.startswith("compile")
    dtype = torch.bfloat16 if stage.endswith("bf16") else torch.float32
    for batch in config.batch_sizes:
        if time.perf_counter() > deadline:
            notes.append(f"{spec.name} {stage} b{batch}: skipped, the {config.budget_s:.0f} s budget ran out")
            continue
        inputs, extra, runners = spec.inputs(batch, device, dtype), {}, {}
        for name, module in modules.items():
            label = f"{spec.name} {stage} b{batch} {name}"
            if name != "unfused" and compiled and time.perf_counter() > deadline:
                notes.append(f"{label}: not compiled, the budget ran out")
                continue
            done = first_call(label, module, inputs, references[(name, batch)], compiled, config, device, notes)
            if done is not None:
                runners[name], extra[name] = done
        if "unfused" not in runners:
            notes.append(f"{spec.name} {stage} b{batch}: skipped, `unfused` did not run")
            continue
        times = interleaved(runners, config, device)
        rows += rows_for(spec.name, stage, batch, times, extra)
        log.info("%s %s b%d: %s", spec.name, stage, batch,
                 ", ".join(f"{v} {sorted(t)[len(t) // 2] * 1e3:.2f} ms" for v, t in times.items()))
    return rows


# ----------------------------------------------------------------------------- the run

def environment(device) -> dict:
    import platform

    import torch

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version(),
            "tf32 matmul": str(torch.backends.cuda.matmul.allow_tf32), "logical cores": str(os.cpu_count())}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the run needs it; environment() only describes
        pass
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["compute capability"] = f"{major}.{minor}"
        info["driver"] = _driver()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _driver() -> str:
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def references_for(spec, variants: dict, references: dict, config: GpuCheckConfig, device) -> dict:
    """(variant, batch) -> the fp32 eager output of the variant's reference module, on the device."""
    import torch

    out, cache = {}, {}
    with torch.inference_mode():
        for batch in config.batch_sizes:
            inputs = spec.inputs(batch, device)
            for name in variants:
                ref = references[name]
                if (id(ref), batch) not in cache:
                    cache[(id(ref), batch)] = ref(**inputs).float()
                out[(name, batch)] = cache[(id(ref), batch)]
    return out


def run(config: GpuCheckConfig) -> dict:
    import torch

    from benchmarks.gpu_models import ModelSpec, build_variants

    started, clock = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    deadline = clock + config.budget_s
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: a second OpenMP thread only spins against the machine's other work
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # several variants of one class: the default 8 falls back to eager
            setattr(torch._dynamo.config, name, 256)
    rows, build_s, notes = [], {}, []
    built = {}
    for model in config.models:
        spec = ModelSpec(model, tiny=config.dry_run, seq_len=config.seq_len)
        begin = time.perf_counter()
        variants, references = build_variants(spec.build(), notes)
        variants = {k: v.to(device) for k, v in variants.items()}
        references = {k: v.to(device) for k, v in references.items()}
        built[model] = (spec, variants, references_for(spec, variants, references, config, device))
        del references
        build_s[model] = time.perf_counter() - begin
    with torch.inference_mode():
        for stage in config.stages:
            for model, (spec, variants, refs) in built.items():
                left = deadline - time.perf_counter()
                need = config.compile_reserve_s if stage.startswith("compile") else 0.0
                if left <= need:
                    notes.append(f"{model} {stage}: skipped, {max(left, 0):.0f} s of the {config.budget_s:.0f} s "
                                        f"budget left (needs > {need:.0f} s)")
                    continue
                rows += run_stage(spec, stage, variants, refs, config, device, notes, deadline)
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"started": started, "wall_s": time.perf_counter() - clock, "dry_run": config.dry_run,
            "config": asdict(config), "environment": environment(device), "build_s": build_s, "rows": rows,
            "notes": notes}


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="tiny models, few rounds (also what runs without CUDA)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if torch sees one, else a CPU dry run)")
    p.add_argument("--stages", default=None, help=f"comma list of {', '.join(STAGES)} (default: all, in that order)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default: both)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,32; a dry run: 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20; a dry run: 3)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the run (default 420)")
    p.add_argument("--json", type=Path, default=None, help=f"results (default {RESULTS}; a dry run: {DRY_RESULTS})")
    p.add_argument("--out", type=Path, default=None, help=f"report to update (default {OUT}; a dry run: {DRY_OUT})")
    p.add_argument("--plots", type=Path, default=None, help="plot folder (default: benchmarks/plots; a dry run: "
                   "beside --out)")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS",
                   help="measure nothing: render --out's GPU section from this results JSON")


def config_from(args) -> GpuCheckConfig:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    base = dry_run_config(device) if args.dry_run or device == "cpu" else GpuCheckConfig(device=device)
    given = {"stages": _names(args.stages), "models": _names(args.models),
             "batch_sizes": tuple(int(x) for x in _names(args.batch_sizes) or ()) or None,
             "rounds": args.rounds, "budget_s": args.budget_s}
    given = {k: v for k, v in given.items() if v}
    if "rounds" in given:
        given["min_rounds"] = min(base.min_rounds, given["rounds"])
    return replace(base, **given)


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(x for x in text.split(",") if x) if text else None


def main(args) -> int:
    import json

    from benchmarks import gpu_check_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render is not None:
        result = json.loads(args.render.read_text())
    else:
        try:
            config = config_from(args)
        except ValueError as exc:
            sys.stderr.write(f"gpu-check: {exc}\n")
            return 2
        result = run(config)
        path = args.json or (DRY_RESULTS if config.dry_run else RESULTS)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", path)
    dry = result["dry_run"]
    out = args.out or (DRY_OUT if dry else OUT)
    plots = args.plots or (out.parent if dry else Path("benchmarks/plots"))
    gpu_check_report.write(out, result, plot_dir=plots)
    sys.stdout.write(f"wrote the GPU check section of {out}\n")
    return 0


def register(modes) -> None:
    """`normfuse bench gpu-check` (benchmarks.cli registers it; the heavy imports happen in main)."""
    p = modes.add_parser("gpu-check", help="fused vs unfused vs UN-folded ViT-S and GPT-2-small in torch eager, "
                         "torch.compile and bf16 on a CUDA GPU (a CPU dry run without one)")
    add_arguments(p)
    p.set_defaults(handler=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
