"""The "Serving defaults and overload" section of BENCHMARKS.md, rendered from `normfuse bench overload`'s JSON
(benchmarks/results/overload.json) between its own markers, so it can be re-rendered without re-running and
merges apart from the other sections."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.overload_bench import targets, window_ratio
from benchmarks.report import _num, splice, table

BEGIN, END = "<!-- overload:begin -->", "<!-- overload:end -->"


def section(result: dict) -> str:
    c, e, d, o = result["config"], result["engine"], result["defaults"], result["overload"]
    t = d["throughput_c32"]
    parts = [
        "## Serving defaults and overload",
        "`normfuse serve` with its **default settings** (adaptive batching: `max_queue_delay_ms` 0, "
        f"`max_batch_size` 16, `max_inflight` 64, shadow off) serving `{c['model']}` (variant `{e['variant']}`, "
        "ONNX Runtime CPU); only the row marked *2 ms window* changes a setting. Traffic to 127.0.0.1 only, every "
        "step bounded in requests and seconds. **The machine was shared with other jobs while this ran** "
        f"(2 cores; load average {result.get('load_start', '?')} at start, {result.get('load_end', '?')} at "
        "end): compare within this run.",
        table(["measure", "value"], [
            ["engine alone, batch 1, p50 (in process)", f"{_num(e['p50_ms'], '.3f')} ms"],
            ["served, Triton's HTTP client, binary, concurrency 1, p50", f"{_num(d['triton_c1']['p50_ms'], '.3f')} ms"],
            ["served p99 (same)", f"{_num(d['triton_c1']['p99_ms'], '.3f')} ms"],
            ["overhead (served p50 - engine p50)", f"{_num(d['triton_c1']['p50_ms'] - e['p50_ms'], '.3f')} ms"],
            ["concurrency 32, req/s, default: median (each round)", _rounds(t["default"])],
            ["concurrency 32, req/s, *2 ms window* (the former default): median (each round)",
             _rounds(t["window_2ms"])],
            ["default ÷ 2 ms window (ratio of medians, paired bootstrap 95% interval over the rounds)",
             str(window_ratio(result))],
        ]),
        f"**Overload:** {o['clients']['small'] + o['clients']['big'] + o['clients']['malformed']} concurrent "
        f"clients for {c['flood_s']:g} s ({o['clients']['big']} sending {c['big_rows']}-row JSON bodies, "
        f"{o['clients']['malformed']} sending malformed bodies, {o['clients']['small']} batch-1 binary requests), "
        f"against a capacity of {o['capacity_items_per_s']:.0f} items/s measured just before (closed loop, 32).",
        table(["clients", *sorted(o["all_codes"])],
              [[kind, *[str(o["codes"][kind].get(code, 0)) for code in sorted(o["all_codes"])]] for kind in o["codes"]]),
        table(["measure", "value"], [
            ["goodput: items answered per second during the flood", f"{o['goodput_items_per_s']:.0f} "
             f"({o['goodput_items_per_s'] / o['capacity_items_per_s']:.0%} of capacity)"],
            ["items answered: batch-1 requests / large requests", f"{o['codes']['small'].get('200', 0)} / "
             f"{o['codes']['big'].get('200', 0) * c['big_rows']}"],
            ["of which batch-1 requests alone, per second", f"{o['codes']['small'].get('200', 0) / o['elapsed_s']:.0f} "
             f"({o['codes']['small'].get('200', 0) / o['elapsed_s'] / o['capacity_items_per_s']:.0%} of capacity)"],
            ["admitted requests (200), every kind: p50 / p99", f"{_num(o['admitted_p50_ms'])} / "
             f"{_num(o['admitted_p99_ms'])} ms"],
            ["server RSS growth (peak - before)", f"{o['rss_growth_mib']:.0f} MiB (from {o['rss_before_mib']:.0f} MiB)"],
            ["unloaded p50, before / right after", f"{_num(o['unloaded_p50_ms_before'], '.3f')} / "
             f"{_num(o['unloaded_p50_ms_after'], '.3f')} ms"],
        ]),
        "Reading it: a large request holds one queue place and is served in slices of 16 rows taking turns with "
        "the others, so the large requests carry most of the items and the admitted p99; a request over "
        "`max_inflight` is refused from its headers. What is left of the small requests' latency is mostly the "
        "event loop parsing multi-megabyte JSON bodies (Python's parser holds the GIL) on a machine whose two "
        "cores also run the load generator.",
        "Targets of this run: " + "; ".join(f"{name}: **{'met' if ok else 'NOT met'}**"
                                           for name, ok in targets(result).items()) + ".",
    ]
    return "\n\n".join(parts)


def _rounds(values: list[float]) -> str:
    return f"{np.median(values):.0f} ({', '.join(f'{v:.0f}' for v in values)})"


def write(out: Path, result: dict) -> Path:
    """Replace the section in `out` (or add it), keeping everything else."""
    return splice(out, BEGIN, END, f"{BEGIN}\n{section(result)}\n{END}")
