"""BENCHMARKS.md's gRPC section and its plot, rendered from `normfuse bench grpc`'s results JSON alone (so it can
be re-rendered into a report made by another run, between its own markers)."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.grpc_bench import GRPC, REST, TRITON
from benchmarks.report import _num, splice, table

GRPC_BEGIN, GRPC_END = "<!-- grpc:begin -->", "<!-- grpc:end -->"
TITLE = "## gRPC vs REST binary, beside Triton's gRPC"
P50_TARGET_MS = 0.5  # the issue: gRPC concurrency-1 p50 within 0.5 ms of REST binary


def verdicts(result: dict) -> list[list[str]]:
    """The issue's two targets against this run: [target, measured, verdict]."""
    summary, rows = result["summary"], []
    c1, c32 = summary.get("1", {}).get("grpc_minus_rest_p50_ms"), summary.get("32", {}).get("grpc_over_rest_rps")
    if c1:
        rounds = ", ".join(f"{d:+.2f}" for d in c1["rounds"])
        rows.append([f"concurrency 1: gRPC p50 within {P50_TARGET_MS} ms of REST binary",
                     f"gRPC − REST p50 = {c1['median']:+.2f} ms (rounds: {rounds})",
                     "met" if c1["median"] <= P50_TARGET_MS else "not met"])
    if c32:
        rounds = ", ".join(f"{r:.2f}" for r in c32["rounds"])
        rows.append(["concurrency 32: gRPC throughput ≥ REST binary",
                     f"gRPC ÷ REST req/s = {c32['median']:.2f} (rounds: {rounds})",
                     "met" if c32["median"] >= 1.0 else "not met"])
    return rows


def grpc_section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    config, settings = result["config"], result["server_settings"]
    load = result["machine"].get("load average (1/5/15 min) at start", "?")
    end = " ".join(f"{x:.2f}" for x in result.get("load_at_end", []))
    parts = [f"Measured by `normfuse bench grpc` at {result['started']} ({result['wall_s']:.0f} s; load average {load} "
             f"at start, {end} at end, {result['machine'].get('logical cores')} logical cores). **The machine was "
             "shared with other jobs**: read the ratios within a round, not the absolute numbers. Model "
             f"`{result['model']}`, variant `{result['variant']}` (what an unversioned request gets). `normfuse serve` "
             f"with its default settings (max batch {settings['max_batch_size']}, queue delay "
             f"{settings['max_queue_delay_ms']:g} ms; REST and gRPC in the one process); Triton (pytriton) serving the "
             "same ONNX file with the same max batch and queue delay. Closed loop, batch-1 requests, "
             f"{config['rounds']} interleaved rounds of {config['step_seconds']:g} s per target and concurrency "
             "(order rotated each round); the clients (aiohttp for REST, grpcio's asyncio stub for both gRPC "
             "servers, one pre-encoded request each) run on the same cores as the servers, so each client's own CPU cost per "
             "call (HTTP/1.1 parsing in aiohttp, HTTP/2 framing in grpcio's C core) is inside every latency and caps "
             "every throughput."]
    if result.get("skipped"):
        parts.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + ".")
    parts.append(table(["target", "measured", "verdict"], verdicts(result)))
    labels = [label for label in (REST, GRPC, TRITON)
              if any(label in s["medians"] for s in result["summary"].values())]
    parts.append("Medians over the rounds:")
    parts.append(table(
        ["concurrency", *[f"{label} {what}" for label in labels for what in ("p50 ms", "p99 ms", "req/s")]],
        [[c, *[_num(s["medians"][label][k], ".0f" if k == "throughput_rps" else ".2f") if label in s["medians"]
               else "–" for label in labels for k in ("p50_ms", "p99_ms", "throughput_rps")]]
         for c, s in result["summary"].items()]))
    errors = sorted({f"{r['label']} c{r['level']}: {k} ×{n}" for r in result["rows"]
                     for k, n in r["codes"].items() if k != "200"})
    parts.append("Every call was answered successfully." if not errors else "Non-success answers: " + "; ".join(errors))
    if plot:
        rel = os.path.relpath(plot, out_dir) if out_dir else str(plot)
        parts.append(f"![p50 and throughput per protocol and concurrency]({rel})")
    return "\n\n".join(parts)


def plot_protocols(result: dict, path: Path) -> Path:
    """Left: p50 per target and concurrency (each round a dot, the median a bar); right: req/s likewise."""
    from benchmarks.plots import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    levels = sorted({r["level"] for r in result["rows"]})
    width = 0.8 / max(1, len(labels))
    for ax, key, title in ((axes[0], "p50_ms", "p50 latency, ms"), (axes[1], "throughput_rps", "throughput, req/s")):
        for i, label in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(levels))]
            values = [[r[key] for r in result["rows"] if r["label"] == label and r["level"] == c] for c in levels]
            ax.bar(xs, [sorted(v)[len(v) // 2] if v else 0 for v in values], width, label=label, alpha=0.75)
            for x, v in zip(xs, values, strict=True):
                ax.scatter([x] * len(v), v, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def write_grpc(out: Path, result: dict, *, plot_dir: Path) -> Path:
    """Render the gRPC section (and its plot) into `out` between its markers; the rest of the file is kept."""
    out = Path(out)
    plot = plot_protocols(result, Path(plot_dir) / "grpc_vs_rest.png")
    block = f"{GRPC_BEGIN}\n{TITLE}\n\n{grpc_section(result, plot, out.parent)}\n{GRPC_END}"
    return splice(out, GRPC_BEGIN, GRPC_END, block)
