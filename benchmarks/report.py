"""Write BENCHMARKS.md from one run's results: the machine, the targets, the tables and the plots."""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks import plots
from benchmarks.one_run import RUN_BEGIN, RUN_END
from benchmarks.targets import evaluate

PACKAGES = ("torch", "onnxruntime", "onnx", "numpy", "transformers", "fastapi", "uvicorn", "httpx", "litserve",
            "nvidia-pytriton")


def machine(load_at_start: tuple[float, ...] | None = None) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu flags that pick plans": _flags(), "logical cores": str(os.cpu_count()),
            "os": platform.platform(),
            "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * size / 2**30:.1f} GiB"
        if load_at_start:
            info["load average (1/5/15 min) at start"] = " ".join(f"{x:.2f}" for x in load_at_start)
        info["load average (1/5/15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (ValueError, OSError, AttributeError):
        pass
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def _flags() -> str:
    """The CPU flags plans depend on (AMX, AVX512-BF16/VNNI/FP16, AVX2), as engines.cpu reads them."""
    try:
        from benchmarks.cpu_peak import FLAGS, read_cpu

        found = read_cpu(lscpu="").flags
    except (OSError, ValueError):
        return "unknown"
    return " ".join(f for f in FLAGS if f in found) or "none of " + " ".join(FLAGS)


def _num(value, fmt: str = ".2f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _interval(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        return "–"
    if math.isnan(row[key]):
        return "undefined (no bound)" if key == "gain" else "–"
    return f"{_num(row[key], fmt)} [{_num(row[key + '_low'], fmt)}, {_num(row[key + '_high'], fmt)}]"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def engine_section(result: dict) -> str:
    rows = result.get("rows", [])
    body = [table(
        ["model", "backend", "batch", "variant", "exact", "rounds", "p50 ms", "p99 ms", "÷ unfused [95% CI]",
         "gain captured [95% CI]"],
        [[r["model"], r["backend"], r["batch"], r["variant"], "yes" if r["exact"] else "no", r["rounds"],
          _num(r["p50_ms"]), _num(r["p99_ms"]), _interval(r, "ratio", ".3f"), _interval(r, "gain", ".0%")]
         for r in rows])]
    notes = [f"- skipped {name}: {why}" for name, why in result.get("skipped", {}).items()]
    notes += [f"- {model}: variant `{variant}` not built: {why}"
              for model, reasons in result.get("not_applicable", {}).items() for variant, why in reasons.items()]
    return "\n\n".join(body + (["\n".join(notes)] if notes else []))


def overhead_table(result: dict) -> str:
    """Per batch size: the engine's p50 and what each server adds to it at concurrency 1."""
    engine = {r["batch"]: r for r in result.get("engine", [])}
    keys = sorted({(r["server"], r["protocol"]) for r in result.get("closed", [])})
    rows = []
    for batch, e in sorted(engine.items()):
        cells = [batch, _num(e["p50_ms"])]
        for key in keys:
            r = next((r for r in result["closed"] if (r["server"], r["protocol"]) == key and r["level"] == 1
                      and r["batch"] == batch and r["ok"]), None)
            cells.append(f"{r['p50_ms']:.2f} (+{r['p50_ms'] - e['p50_ms']:.2f})" if r else "–")
        rows.append(cells)
    return table(["batch", "engine p50 ms"] + [f"{s} {p}" for s, p in keys], rows)


def glance_table(result: dict) -> str:
    """Per server and protocol: p50 at concurrency 1, and the best throughput of the sweep with its p99."""
    rows = []
    for key in sorted({(r["server"], r["protocol"]) for r in result.get("closed", [])}):
        sweep = [r for r in result["closed"] if (r["server"], r["protocol"]) == key and r["batch"] == 1 and r["ok"]]
        if not sweep:
            continue
        c1 = next((r for r in sweep if r["level"] == 1), None)
        best = max(sweep, key=lambda r: r["throughput_rps"])
        rows.append([key[0], key[1], _num(c1["p50_ms"]) if c1 else "–", _num(best["throughput_rps"], ".0f"),
                     best["level"], _num(best["p99_ms"])])
    return table(["server", "protocol", "p50 ms at c=1", "peak req/s", "at concurrency", "p99 ms there"], rows)


def serving_section(result: dict) -> str:
    config = result.get("config", {})
    parts = [f"Model `{result['model']}`, variant `{result['variant']}` (the same ONNX file for every server). "
             f"Batching servers (normfuse, LitServe, Triton): max batch {config.get('max_batch_size')}, queue delay "
             f"{config.get('max_queue_delay_ms')} ms; ONNX Runtime threads: {config.get('threads') or 'default'}.",
             "At a glance (batch-1 requests):", glance_table(result),
             "p50 ms at concurrency 1, and what each server adds to the raw engine's p50 at the same batch size:",
             overhead_table(result),
             "Raw engine, in-process:",
             table(["batch", "p50 ms", "p99 ms", "items/s"],
                   [[r["batch"], _num(r["p50_ms"]), _num(r["p99_ms"]), _num(r["items_per_s"], ".0f")]
                    for r in result.get("engine", [])]),
             "Closed loop (`level` = concurrency; batch = items per request):",
             table(["server", "protocol", "concurrency", "batch", "sent", "ok", "codes", "req/s", "items/s", "p50 ms",
                    "p90 ms", "p99 ms"],
                   [[r["server"], r["protocol"], r["level"], r["batch"], r["sent"], r["ok"],
                     ", ".join(f"{k}: {v}" for k, v in r["codes"].items()), _num(r["throughput_rps"], ".0f"),
                     _num(r["items_per_s"], ".0f"), _num(r["p50_ms"]), _num(r["p90_ms"]), _num(r["p99_ms"])]
                    for r in result.get("closed", [])])]
    if result.get("open"):
        parts += ["Open loop, Poisson arrivals scheduled in advance, latency from the scheduled send time "
                  "(normfuse, binary, per variant):",
                  table(["variant", "offered req/s", "sent", "ok", "codes", "achieved req/s", "p50 ms", "p90 ms",
                         "p99 ms"],
                        [[r["variant"], _num(r["level"], ".0f"), r["sent"], r["ok"],
                          ", ".join(f"{k}: {v}" for k, v in r["codes"].items()), _num(r["throughput_rps"], ".0f"),
                          _num(r["p50_ms"]), _num(r["p90_ms"]), _num(r["p99_ms"])] for r in result["open"]])]
    for name, why in result.get("skipped", {}).items():
        parts.append(f"- skipped server {name}: {why}")
    return "\n\n".join(parts)


CAPACITY_BEGIN, CAPACITY_END = "<!-- capacity:begin -->", "<!-- capacity:end -->"


def _range(cell: dict) -> str:
    if "infeasible" in cell:
        return "infeasible"
    low, high = cell.get("total_range", [None, None])
    spread = f" [{low}–{high}]" if low is not None and high is not None and (low, high) != (cell["total"],) * 2 else ""
    return f"{cell['total']}{spread}"


def _max_rate(check: dict) -> str:
    bound = check["max_rate_bound"]
    if bound.startswith("below"):
        return "< " + bound.split()[1]
    return ("≥ " if bound == "at least" else "") + _num(check["max_rate_measured"], ".0f")


def capacity_section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    """The capacity section of BENCHMARKS.md from `normfuse bench capacity`'s results (self-describing:
    it names its own run, so it can be rendered into a report made by another run)."""
    config, base, fused = result["config"], result["baseline"], result["fused"]
    load = result["machine"].get("load average (1/5/15 min) at start", "?")
    end = " ".join(f"{x:.2f}" for x in result.get("load_at_end", []))
    pinned = all(r.get("pinned") for r in result["saturation"])
    parts = [f"Measured by `normfuse bench capacity` at {result['started']} ({result['wall_s']:.0f} s; load average "
             f"{load} at start, {end} at end; {result['machine'].get('logical cores')} logical cores). Model "
             f"`{result['model']}`, `{base}` vs `{fused}` ({result['fused_why']}). Each server process: 1 replica, "
             f"NORMFUSE_INTRA_OP_THREADS={config['threads']}, max batch {config['max_batch_size']}, queue delay "
             f"{config['max_queue_delay_ms']} ms, {'pinned to its own core' if pinned else 'not pinned'}; the load "
             "generator runs unpinned on the same cores. Model and method: [docs/scaling.md](docs/scaling.md)."]
    mu, ratio = result["closed_mu"], result["closed_mu_ratio"]
    parts.append(f"Saturation, closed loop (concurrency {config['saturation_concurrency']} split over the processes, "
                 f"{config['saturation_rounds']} interleaved rounds of {config['saturation_step_s']} s per variant; "
                 f"median [95% bootstrap CI]). One process: `{fused}` ÷ `{base}` = {ratio['estimate']:.3f} "
                 f"[{ratio['low']:.3f}, {ratio['high']:.3f}].")
    parts.append(table(
        ["processes", "variant", "req/s measured", "req/s model (n × 1 process)", "cores per server", "client cores"],
        [[c["processes"], c["variant"], _num(c["saturation_rps"], ".0f") + (
            f" [{mu[c['variant']]['low']:.0f}, {mu[c['variant']]['high']:.0f}]" if c["processes"] == 1 else ""),
          _num(c["saturation_model_rps"], ".0f"), _num(c["server_cores"]), _num(c["saturation_client_cores"])]
         for c in result["checks"]]))
    parts.append("Fitted per replica (one process's open-loop p99; κ = 1, μ and base fitted, relative least squares):")
    parts.append(table(["variant", "μ req/s [from the closed-loop CI]", "base ms", "κ", "rms relative error", "points"],
                       [[v, f"{f['mu']:.0f} [{f['mu_low']:.0f}, {f['mu_high']:.0f}]", _num(f["base_ms"]),
                         _num(f["kappa"]), _num(f["rms_rel_error"], ".0%"), f["points"]]
                        for v, f in result["fits"].items()]))
    parts.append("Open loop, Poisson arrivals, each request to a process drawn at random; model p99 for n replicas "
                 "= p99(λ/n), with a core each, and with each replica's μ scaled by the CPU share its process got at "
                 "saturation:")
    parts.append(table(
        ["processes", "variant", "offered req/s", "achieved", "codes", "p50 ms", "p99 ms",
         "p99 ms of 1 process at the same rate per process", "model p99 ms",
         "model p99 at CPU share", "client send lag p99 ms", "client cores", "cores per server",
         "machine busy cores"],
        [[r["processes"], r["variant"], _num(r["level"], ".0f"), _num(r["throughput_rps"], ".0f"),
          ", ".join(f"{k}: {v}" for k, v in r["codes"].items()), _num(r["p50_ms"]), _num(r["p99_ms"]),
          _num(r.get("one_process_p99_ms")) if r["processes"] > 1 else "", _num(r["model_p99_ms"]),
          _num(r["model_cpu_p99_ms"]), _num(r.get("send_lag_p99_ms")),
          _num(r["client_cores"]),
          _num(sum(r["server_cores"]) / len(r["server_cores"])), _num(r.get("machine_cores"))]
         for r in sorted(result["sweep"], key=lambda r: (r["processes"], r["variant"] != base, r["level"]))]))
    parts.append(f"Largest rate meeting p99 ≤ {config['slo_ms']:g} ms:")
    parts.append(table(
        ["processes", "variant", "measured req/s", "model req/s", "model at CPU share", "median p99 error of the model"],
        [[c["processes"], c["variant"], _max_rate(c), _num(c["max_rate_model"], ".0f"),
          _num(c["max_rate_model_cpu"], ".0f"), _num(c["p99_error_median_pct"], "+.0f") + "%"]
         for c in result["checks"]]))
    verdict = ("its 95% interval contains 1, so on this model and CPU the fused variant's saving is within noise: "
               "rows where the two differ differ by the fits' noise, not by the rewrite"
               if ratio["low"] <= 1 <= ratio["high"] else
               f"`{fused}` serves {ratio['estimate'] - 1:+.1%} requests per second per replica "
               f"(95% interval {ratio['low'] - 1:+.1%} to {ratio['high'] - 1:+.1%})")
    parts.append(f"Fleet scale (the fitted curves; utilisation ≤ {config['util_cap']:g}, N+{config['spare']}; "
                 f"[range] = replicas over μ's interval). The closed-loop `{fused}` ÷ `{base}` throughput ratio is "
                 f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]; {verdict}.")
    parts.append(table(
        ["req/s", "p99 SLO ms", f"{base} replicas", f"{fused} replicas", "saving", "limited by"],
        [[_num(row["rate"], ",.0f"), _num(row["slo_ms"], "g"), _range(row["variants"][base]),
          _range(row["variants"][fused]),
          (f"{row['variants'][fused]['saving']} ({row['variants'][fused]['saving_pct']:+.1f}%)"
           if "saving" in row["variants"][fused] else "–"),
          row["variants"][base].get("limited_by", "–")] for row in result["fleet"]]))
    if result.get("hpa"):
        parts.append(f"The autoscaler's per-pod targets (deploy/k8s/base/hpa.yaml: mean queue depth "
                     f"{config.get('hpa_queue_depth', 3):g}, p95 queue wait {config.get('hpa_queue_p95_ms', 8):g} ms of modelled wait + the 2 ms batching window) "
                     "on each replica's fitted M/M/1 curve — where a pod is when the HPA starts adding pods:")
        parts.append(table(["variant", "target", "utilisation", "req/s per replica", "model p99 ms there"],
                           [[v, {"queue_depth": "queue depth", "queue_p95": "p95 queue wait"}[name],
                             _num(h["utilisation"]), _num(h["rate"], ".0f"), _num(h["p99_ms"])]
                            for v, targets in result["hpa"].items() for name, h in targets.items()]))
    if plot:
        rel = os.path.relpath(plot, out_dir) if out_dir else str(plot)
        parts.append(f"![p99 vs offered rate, measured and modelled]({rel})")
    return "\n\n".join(parts)


def write_capacity(out: Path, result: dict, *, plot_dir: Path) -> Path:
    """Render the capacity section (and its plot) into `out`, replacing a previous one; the rest is kept."""
    out = Path(out)
    plot = plots.capacity_curves(result, Path(plot_dir) / "capacity.png")
    block = (f"{CAPACITY_BEGIN}\n## Capacity: replicas for a rate and a p99\n\n"
             f"{capacity_section(result, plot, out.parent)}\n{CAPACITY_END}")
    return splice(out, CAPACITY_BEGIN, CAPACITY_END, block)


def splice(out: Path, begin: str, end: str, block: str, *, before: str = "\n## Plots", gap: str = "") -> Path:
    """Put `block` (which starts with `begin` and ends with `end`) into `out` in place of a previous one, else
    before the first `before` (`## Plots`; `\n## ` for a section that goes first, after `gap`), else at the end;
    the rest of the file is kept."""
    out = Path(out)
    text = out.read_text() if out.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif before in text:
        head, rest = text.split(before, 1)
        text = head + gap + block + "\n" + before + rest
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    out.write_text(text)
    return out


METHOD = """\
- **Engines.** All variants of a model (and the benchmark-only `nonorm` bound: the same graph with every norm
  removed, never served) are loaded at once and run interleaved on the same batch, the order rotated each round
  (A B C, B C A, …). Ratios are of medians, with a *paired* bootstrap 95% interval (rounds resampled jointly, so
  noise shared by a round cancels). Gain captured = (T_unfused − T_variant) / (T_unfused − T_nonorm), on medians;
  it is undefined ("–") when removing the norms gave no gain.
- **Serving.** Every server serves the same ONNX file through the same `OnnxRuntimeEngine` options and receives
  the same pre-encoded payloads from `normfuse loadgen`'s client (httpx, asyncio). Batching servers share
  `max_batch_size` and the queue delay (0 ms by default: a batch is whatever queued while the engine was busy,
  Triton's default; a delay > 0 makes a lone request wait for company). The load generator runs on the same
  cores as the servers, so its CPU time is inside every latency and caps every throughput.
- **Closed loop** (a fixed number of requests in flight) is how vendors publish; it hides overload
  (coordinated omission). **Open loop** schedules Poisson arrivals in advance and measures each latency from its
  scheduled send time.
- **Noise.** The machine is shared; numbers can move 2–4× between runs. Compare within a run, read the intervals."""


def write(out: Path, engine_result: dict | None, serving_result: dict | None, *, plot_dir: Path,
          command: str, started: datetime | None = None, notes: list[str] | None = None,
          load_at_start: tuple[float, ...] | None = None, norms: str | None = None,
          capacity: dict | None = None) -> Path:
    """Render BENCHMARKS.md (and its PNGs under plot_dir) from the results of one run."""
    out, plot_dir = Path(out), Path(plot_dir)
    engine_rows = (engine_result or {}).get("rows", [])
    figures = [("Latency per item vs batch size, per variant",
                plots.latency_vs_batch(engine_rows, plot_dir / "latency_vs_batch.png")),
               ("Variant ÷ unfused median with its 95% interval",
                plots.ratio_with_interval(engine_rows, plot_dir / "ratio_ci.png")),
               ("Throughput and p99 vs concurrency, per server",
                plots.throughput_vs_concurrency((serving_result or {}).get("closed", []),
                                                plot_dir / "throughput_vs_concurrency.png"))]
    max_batch = ((serving_result or {}).get("config") or {}).get("max_batch_size", 16)
    when = (started or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    doc = [f"# Benchmarks\n\n{RUN_BEGIN}\nGenerated by `{command}` at {when}. Every number below is the one this run "
           f"produced; re-run `make bench` to regenerate this file and its plots.\n{RUN_END}",
           "## Machine\n\n" + table(["", ""], [[k, v] for k, v in machine(load_at_start).items()]),
           "## Targets\n\nGoals from the issue, checked against this run (not test assertions).\n\n" + table(
               ["target", "measured", "verdict"],
               [[t.goal, t.measured, t.verdict] for t in evaluate(engine_rows, serving_result, max_batch)])]
    if engine_result is not None:
        doc.append("## Fused vs unfused, engine level\n\n" + engine_section(engine_result))
    if norms is not None:
        doc.append("## Trained-in norms: LN vs Unified Normalization vs PowerNorm (vit-digits)\n\n" + norms
                   + "\n\nUN folds away completely (no norm op left); PowerNorm keeps its per-token group scaling. "
                   "Details: [docs/un-powernorm.md](docs/un-powernorm.md).")
    if serving_result is not None:
        doc.append("## Serving overhead and peers\n\n" + serving_section(serving_result))
    if capacity is not None:
        plot = plots.capacity_curves(capacity, plot_dir / "capacity.png")
        doc.append(f"{CAPACITY_BEGIN}\n## Capacity: replicas for a rate and a p99\n\n"
                   f"{capacity_section(capacity, plot, out.parent)}\n{CAPACITY_END}")
    doc.append("## Plots\n\n" + "\n\n".join(
        f"{title}:\n\n![{title}]({os.path.relpath(path, out.parent)})" for title, path in figures if path))
    doc.append("## Method\n\n" + METHOD)
    if notes:
        doc.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    see_also = ["[docs/benchmarks.md](docs/benchmarks.md) (how to run)"]
    if (out.parent / "docs" / "un-powernorm.md").is_file():
        see_also.append("[docs/un-powernorm.md](docs/un-powernorm.md) (Unified Normalization / PowerNorm figures)")
    doc.append("See also " + " and ".join(see_also) + ".")
    out.write_text("\n\n".join(doc) + "\n")
    return out
