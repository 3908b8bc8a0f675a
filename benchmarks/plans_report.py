"""BENCHMARKS.md's first section, the CPU plans table (between PLANS_BEGIN / PLANS_END), and its plot, rendered
from `normfuse bench plans`'s results JSON alone."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.plans_targets import targets
from benchmarks.report import _num, splice, table

PLANS_BEGIN, PLANS_END = "<!-- plans:begin -->", "<!-- plans:end -->"
TITLE = "## CPU plans: every plan ÷ ORT fp32 `unfused` and ÷ OpenVINO's default compile"


def _speedup(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return f"{_num(row[key])}× [{_num(row[key + '_low'])}, {_num(row[key + '_high'])}]"


def plans_table(rows: list[dict]) -> str:
    ordered = sorted(rows, key=lambda r: (r["model"], r["batch"], r["threads"] == 0, r["threads"]))
    return table(
        ["model", "batch", "threads", "plan (variant/engine/precision)", "runs at", "rounds", "p50 ms",
         "× ORT fp32 unfused [95% CI]", "× OpenVINO default [95% CI]", "GFLOP/s", "% of peak (unit)",
         "rel-L2 vs ORT fp32"],
        [[r["model"], r["batch"], f"{r['threads']}" if r["threads"] else f"all ({r['cores']})", r["plan"],
          r["precision"], r["rounds"], _num(r["p50_ms"]), _speedup(r, "vs_ort"), _speedup(r, "vs_ov"),
          _num(r.get("gflops"), ".1f"),
          f"{_num(100 * r['peak_fraction'], '.0f')}% ({r['unit']})" if r.get("peak_fraction") is not None else "–",
          _num(r.get("rel_l2"), ".1e")] for r in ordered])


def peak_table(cpu: dict) -> str:
    mhz = cpu["mhz"]
    return table(["precision", "unit on this CPU", "FLOP (ops) per core per cycle", "GFLOP/s per core"],
                 [[p, unit, rate, _num(rate * mhz / 1e3, ".0f")] for p, (unit, rate) in cpu["per_cycle"].items()])


def headlines(rows: list[dict], defaults: dict | None = None) -> list[str]:
    """The issue's targets, read off this run (benchmarks, not test assertions); `defaults`: model -> the plan
    `normfuse convert`'s defaults serve on this CPU (benchmarks.plans_models.default_plan)."""
    lines = []
    for model in sorted({r["model"] for r in rows}):
        picked = [r for r in rows if r["model"] == model and r["batch"] == 8 and r["threads"] == 1 and "vs_ort" in r]
        if not picked:
            continue
        best = max(picked, key=lambda r: r["vs_ort"])
        peer = next((r for r in picked if r["plan"] == "unfused/openvino/default"), None)
        exact = [r for r in picked if "int8" not in r["precision"]]
        best_exact = max(exact, key=lambda r: r["vs_ort"]) if exact else None
        text = f"- {model}, batch 8, 1 thread: fastest plan `{best['plan']}` {best['vs_ort']:.2f}× ORT fp32 unfused"
        if best_exact is not None and best_exact is not best:
            text += f"; fastest non-int8 `{best_exact['plan']}` {best_exact['vs_ort']:.2f}×"
        if peer is not None:
            text += f"; OpenVINO's default ({peer['precision']}) {peer['vs_ort']:.2f}×"
        lines.append(text + ".")
        if model in (defaults or {}):
            lines.append(default_line(model, (defaults or {})[model], picked))
    return lines


def default_line(model: str, default: dict, picked: list[dict]) -> str:
    """normfuse's own default for `model` (what `normfuse serve` serves after a default conversion) against ORT fp32
    `unfused` and OpenVINO's default compile, with the verdict on the issue's non-AMX target (never slower)."""
    text = f"  - normfuse's default for {model} on this CPU: `{default['version']}`"
    row = next((r for r in picked if r["plan"] == default["plan"]), None)
    if row is None:
        return text + f" (`{default['plan']}`: not a row of this table)."
    text += (f" = `{row['plan']}`: {row['vs_ort']:.2f}× [{row['vs_ort_low']:.2f}, {row['vs_ort_high']:.2f}] ORT fp32 "
             f"unfused")
    if "vs_ov" in row:
        text += f", {row['vs_ov']:.2f}× [{row['vs_ov_low']:.2f}, {row['vs_ov_high']:.2f}] OpenVINO's default"
    slower = row["vs_ort_high"] < 1
    return text + (" — **slower than ORT fp32 unfused** (its interval lies below 1)." if slower else
                   " — not slower than ORT fp32 unfused (its interval reaches or passes 1).")


def amx_note(cpu: dict) -> list[str]:
    if "amx_bf16" in cpu["flags"]:
        return []
    return ["- This CPU has no AMX: the issue's targets (default plan ≥ 4× ORT fp32 at batch 8) are for AMX machines, "
            f"where bf16 runs at 1024 FLOP a cycle a core; here bf16 runs on {cpu['per_cycle']['bf16'][0]} at "
            f"{cpu['per_cycle']['bf16'][1]} ({cpu['per_cycle']['bf16'][1] / cpu['per_cycle']['fp32'][1]:g}× the fp32 "
            "rate), so about 2× is the ceiling of a bf16 plan here, and int8 (VNNI) the fastest unit."]


def served_part(served: dict) -> list[str]:
    from benchmarks.plans_served_report import HEADER, describe, hint_lines, rows

    parts = [describe(served), table(HEADER, rows(served))]
    for other in served.get("others", []):
        parts += [describe(other, again=True), table(HEADER, rows(other))]
    if served.get("hints"):
        parts += hint_lines(served["hints"])
    return parts


def section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    cpu, machine, versions = result["cpu"], result.get("machine", {}), result.get("versions", {})
    load = machine.get("load average (1/5/15 min) at start", "?"), machine.get("load average (1/5/15 min) at end", "?")
    parts = [f"Measured by `normfuse bench plans` at {result['started']} in {result['wall_s']:.0f} s, all rows in this "
             f"one run on one machine: **{cpu['describe']}**; {machine.get('logical cores', '?')} logical cores; load "
             f"average {load[0]} at start, {load[1]} at end (the machine is shared: read the ratios). "
             + "; ".join(f"{k} {v}" for k, v in versions.items()) + ".",
             "A plan is (variant, engine, precision), run by `benchmarks/plans.py` over the ONNX files `normfuse "
             "convert` wrote, opened as raw ONNX Runtime and OpenVINO sessions (as a user of each library would; the "
             "served figures below go through normfuse's engines and server). `runs at` is "
             "what the engine reports: OpenVINO's default precision on this CPU resolves to it. `openvino/int8` is "
             "`nncf.quantize` of the unfused file (transformer preset: NNCF's own SmoothQuant) on random calibration "
             "inputs; `int8/onnxruntime` is normfuse's `int8` variant (smoothed, static QDQ). Speed-ups are ratios of "
             "medians of interleaved rounds with paired bootstrap 95% intervals; GFLOP/s counts the unfused graph's "
             "MatMul/Gemm/Conv FLOPs at the timed shapes; the peak is the unit's rate × the threads × the clock "
             "(`benchmarks/cpu_peak.py`: vendors' widths, not measured). Random weights except vit-digits (trained) "
             "and all-MiniLM-L6-v2 (pretrained); inputs are random (token ids < 1000), GPT-2 and MiniLM at sequence "
             f"{result['config']['seq_len']}.",
             "Peak per core on this CPU" + (" (the clock is the current reading a virtual machine reports; a boost "
                                           "clock above it shows as a fraction over 100%)" if "current" in
                                           cpu["mhz_source"] else "") + ":", peak_table(cpu),
             plans_table(result["rows"]),
             "\n".join(headlines(result["rows"], result.get("defaults")) + amx_note(cpu)),
             "Issue 21's targets, read off this run (benchmarks/plans_targets.py; the int8 accuracy targets are in "
             "the int8 section):", table(["target", "measured", "verdict"], targets(result))]
    parts.append("\n".join(f"- {n}" for n in result.get("notes", [])))
    if result.get("served"):
        parts += served_part(result["served"])
    if plot is not None:
        rel = os.path.relpath(plot, out_dir) if out_dir is not None else str(plot)
        parts.append(f"![speed-up over ORT fp32 unfused per plan]({Path(rel).as_posix()})")
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path | None:
    """Speed-up over ORT fp32 unfused per plan at batch 8, one panel per model, 1 thread and all threads."""
    from benchmarks import plots

    plt = plots.plt
    rows = [r for r in result["rows"] if "vs_ort" in r and r["batch"] == max(x["batch"] for x in result["rows"])]
    models = sorted({r["model"] for r in rows})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        names = sorted({r["plan"] for r in rows if r["model"] == model})
        for i, threads in enumerate(sorted({r["threads"] for r in rows if r["model"] == model}, key=lambda t: t == 0)):
            got = {r["plan"]: r for r in rows if r["model"] == model and r["threads"] == threads}
            xs = [j + 0.4 * i for j in range(len(names))]
            values = [got[n]["vs_ort"] if n in got else 0 for n in names]
            errors = [[max(v - got[n]["vs_ort_low"], 0) if n in got else 0 for n, v in zip(names, values, strict=True)],
                      [max(got[n]["vs_ort_high"] - v, 0) if n in got else 0 for n, v in zip(names, values, strict=True)]]
            ax.bar(xs, values, 0.4, yerr=errors, capsize=2, label="1 thread" if threads == 1 else
                   f"{threads} threads" if threads else "all threads")
        ax.axhline(1.0, color="black", lw=0.8)
        default = ((result.get("defaults") or {}).get(model) or {}).get("plan")
        labels = [f"★ {n}" if n == default else n for n in names]
        ax.set_xticks([j + 0.2 for j in range(len(names))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{model}, batch {rows[0]['batch']}" + ("  (★ normfuse's default)" if default else ""),
                     fontsize=10)
        ax.set_ylabel("× ORT fp32 unfused (higher: faster)", fontsize=8)
        ax.legend(fontsize=7)
    return plots._save(fig, path)


def splice_first(out: Path, block: str) -> Path:
    """`block` in place of a previous plans section, else before the first `## ` section (the first table)."""
    return splice(out, PLANS_BEGIN, PLANS_END, block, before="\n## ", gap="\n")


def keep(out: Path, *, plot_dir: Path, results: Path = Path("benchmarks/results/plans.json")) -> Path | None:
    """`bench all` rewrites BENCHMARKS.md: put the plans table back first, from `bench plans`' committed results."""
    import json

    if not Path(results).is_file():
        return None
    return write(out, json.loads(Path(results).read_text()), plot_dir=plot_dir)


def write(out: Path, result: dict, *, plot_dir: Path) -> Path:
    out = Path(out)
    picture = plot(result, Path(plot_dir) / "plans.png")
    return splice_first(out, f"{PLANS_BEGIN}\n{TITLE}\n\n{section(result, picture, out.parent)}\n{PLANS_END}")
