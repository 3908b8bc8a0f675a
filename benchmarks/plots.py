"""PNG plots for BENCHMARKS.md (matplotlib, Agg backend): one function per figure, each returns its path."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import FuncFormatter  # noqa: E402

_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # 1, 2, 4 … instead of 2^0 or 1.0


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[f"{row['model']} ({row['backend']})"].append(row)
    return grouped


def latency_vs_batch(rows: list[dict], path: Path) -> Path | None:
    """Median latency per item vs batch size, one line per variant, one panel per model."""
    grouped = _by_model(rows)
    if not grouped:
        return None
    fig, axes = plt.subplots(1, len(grouped), figsize=(5 * len(grouped), 3.8), squeeze=False)
    for ax, (title, model_rows) in zip(axes[0], grouped.items(), strict=True):
        variants = sorted({r["variant"] for r in model_rows}, key=lambda v: (v != "unfused", v == "nonorm", v))
        for variant in variants:
            points = sorted((r["batch"], r["p50_ms"] / r["batch"]) for r in model_rows if r["variant"] == variant)
            style = "--" if variant == "nonorm" else "-"
            ax.plot(*zip(*points, strict=True), style, marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.set_xlabel("batch size")
        ax.set_ylabel("median ms per item")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def ratio_with_interval(rows: list[dict], path: Path) -> Path | None:
    """Each variant's median ÷ unfused median with its bootstrap 95% interval, per model and batch."""
    rows = [r for r in rows if "ratio" in r and r["variant"] != "unfused"]
    if not rows:
        return None
    labels = [f"{r['model']} b{r['batch']} {r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        color = "tab:gray" if r["variant"] == "nonorm" else "tab:blue"
        ax.errorbar(r["ratio"], i, xerr=[[r["ratio"] - r["ratio_low"]], [r["ratio_high"] - r["ratio"]]],
                    fmt="o", color=color, capsize=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median latency ÷ unfused median  (< 1 is faster; gray = no-norm bound)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def throughput_vs_concurrency(rows: list[dict], path: Path) -> Path | None:
    """Closed-loop throughput (batch-1 requests) vs concurrency, one line per server and protocol."""
    rows = [r for r in rows if r["batch"] == 1 and r["mode"] == "closed"]
    if not rows:
        return None
    fig, (ax, ax_p99) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["server"], r["protocol"]) for r in rows}):
        points = sorted((r["level"], r["throughput_rps"], r["p99_ms"]) for r in rows
                        if (r["server"], r["protocol"]) == key)
        levels, rps, p99 = zip(*points, strict=True)
        ax.plot(levels, rps, marker="o", label=f"{key[0]} {key[1]}")
        ax_p99.plot(levels, p99, marker="o", label=f"{key[0]} {key[1]}")
    for axis, label in ((ax, "requests/s"), (ax_p99, "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(_PLAIN)
        axis.set_xlabel("concurrency (closed loop)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    ax_p99.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def capacity_curves(result: dict, path: Path) -> Path | None:
    """p99 vs offered rate per variant: measured with 1 and 2 processes, the model for 1 and 2 replicas."""
    import numpy as np

    from benchmarks.capacity_model import QueueFit

    variants = [result["baseline"], result["fused"]]
    if not result.get("sweep") or not result.get("fits"):
        return None
    share = {(c["processes"], c["variant"]): c["cpu_share"] for c in result.get("checks", [])}
    slo = result["config"]["slo_ms"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.2), sharey=True, squeeze=False)
    colors = {1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:red"}
    for ax, variant in zip(axes[0], variants, strict=True):
        f = result["fits"][variant]
        fit = QueueFit(mu=f["mu"], base_s=f["base_ms"] / 1e3, kappa=f["kappa"], q=f["q"])
        for n in sorted({r["processes"] for r in result["sweep"]}):
            rows = sorted((r for r in result["sweep"] if (r["processes"], r["variant"]) == (n, variant)),
                          key=lambda r: r["level"])
            clean = [r for r in rows if r["ok"] == r["sent"]]
            color = colors.get(n, "tab:gray")
            ax.plot([r["level"] for r in clean], [r["p99_ms"] for r in clean], "o", color=color,
                    label=f"measured, {n} process{'es' if n > 1 else ''}")
            ax.plot([r["level"] for r in rows if r not in clean], [r["p99_ms"] for r in rows if r not in clean],
                    "x", color=color, label="_errors")
            rates = np.linspace(0, n * fit.mu * 0.995, 200)
            ax.plot(rates, [fit.latency(x / n) * 1e3 for x in rates], "-", color=color,
                    label=f"model, {n} replica{'s' if n > 1 else ''}")
            cpu = share.get((n, variant), 1.0)
            if n > 1 and cpu < 0.99:
                slow = fit.with_mu(fit.mu * cpu)
                rates = np.linspace(0, n * slow.mu * 0.995, 200)
                ax.plot(rates, [slow.latency(x / n) * 1e3 for x in rates], ":", color=color,
                        label=f"model, {n} replicas at the measured CPU share ({cpu:.2f} core each)")
        ax.axhline(slo, color="black", linewidth=0.8, linestyle="--", label=f"SLO {slo:g} ms")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate, req/s (open loop, Poisson)")
        ax.set_title(f"{result['model']} {variant}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("p99 latency, ms")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)
