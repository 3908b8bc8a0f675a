"""The served figures' part of BENCHMARKS.md's plans section (benchmarks/plans_report.py calls it): the paragraph,
the table rows and the hint comparison, from the results `benchmarks/plans_served.py` measured."""

from __future__ import annotations

from benchmarks.plans_served import ENGINE
from benchmarks.report import table


def rows(served: dict) -> list[list]:
    """[target, concurrency, p50 ms, throughput, ÷ engine [95%], mean batch] rows for the report."""
    if not served.get("interleaved"):
        return _rows_not_interleaved(served)
    out = []
    for level, summary in sorted(served["summary"].items(), key=lambda kv: int(kv[0])):
        engine = next(r for r in served["engine"] if r["batch"] == (1 if level == "1" else
                                                                      int(served["server_settings"]["max_batch_size"])))
        cpu = summary["medians"][ENGINE].get("cpu_ms_per_item")
        out.append([f"raw engine, batch {engine['batch']}", level,
                    f"{engine['p50_ms']:.1f}", f"{engine['items_per_s']:.2f} items/s", "1.00", "–",
                    f"{cpu['bench']:.0f} (engine)" if cpu else "–"])
        for label, m in summary["medians"].items():
            share = summary["vs_engine"].get(label)
            if share is None:
                continue
            mean_batch, cpu = m.get("mean_batch"), m.get("cpu_ms_per_item")
            out.append([label, level, f"{m['p50_ms']:.1f}", f"{m['throughput_rps']:.2f} req/s",
                        f"{share['estimate']:.2f} [{share['low']:.2f}, {share['high']:.2f}]",
                        f"{mean_batch:.1f}" if mean_batch else "–",
                        f"{cpu['server']:.0f} + {cpu['bench']:.0f}" if cpu else "–"])
    return out


def _rows_not_interleaved(served: dict) -> list[list]:
    """An older results file (engine measured after the server, no interval)."""
    engine = {r["batch"]: r for r in served["engine"]}
    batch = int(served["server_settings"]["max_batch_size"])
    out = [[f"raw engine, batch {b}", "–", f"{engine[b]['p50_ms']:.1f}", f"{engine[b]['items_per_s']:.2f} items/s",
            "1.00", "–", "–"] for b in (1, batch)]
    for level, summary in sorted(served["summary"].items(), key=lambda kv: int(kv[0])):
        ref = engine[1] if int(level) == 1 else engine[batch]
        for label, m in summary["medians"].items():
            out.append([label, level, f"{m['p50_ms']:.1f}", f"{m['throughput_rps']:.2f} req/s",
                        f"{m['throughput_rps'] / ref['items_per_s']:.2f}", "–", "–"])
    return out


HEADER = ["target", "concurrency", "p50 ms", "throughput", "÷ raw engine, paired [95% CI]", "mean batch formed",
          "CPU ms per item: server + load generator"]


def describe(served: dict, *, again: bool = False) -> str:
    """The paragraph above the served table (`again`: a further run, said in one line)."""
    s, e = served["server_settings"], served.get("engine_described", {})
    how = ", ".join(f"{k} {v}" for k, v in e.items() if k in ("runtime", "precision", "hint", "streams", "threads",
                                                              "parallelism"))
    changed = {k: v for k, v in s.items() if k.startswith("NORMFUSE_")}
    settings = "its defaults" + (f" except {changed}" if changed else "")
    what = "its default version on this CPU," if served.get("default", True) else "requests naming the version"
    if again:
        return (f"The same ({served['started']}, {served['rounds']} rounds of {served['step_seconds']:g} s) with "
                f"{settings}, {what} `{served['variant']}` ({how}):")
    if not served.get("interleaved"):
        return (f"Served ({served['started']}): `normfuse serve` with its defaults serving {served['model']}'s "
                f"`{served['variant']}`; the raw engine measured after the server, not interleaved.")
    return (f"Served ({served['started']}, after the table, same machine): `normfuse serve` with {settings} (max batch "
            f"{s['max_batch_size']}, queue delay {s['max_queue_delay_ms']} ms) serving {served['model']}: "
            f"{what} `{served['variant']}` ({how}), batch-1 requests. The raw engine is the same version "
            "opened in the benchmark's process with the server's options, at c=32 driven like the batcher drives it "
            f"(parallelism threads, batches of {s['max_batch_size']}), at c=1 one call at batch 1. "
            f"{served['rounds']} rounds of {served['step_seconds']:g} s per target and concurrency, engine and "
            "server interleaved, the order rotated each round (`benchmarks/plans_served.py`); the share is served "
            "req/s ÷ engine items/s, ratio of medians with a paired bootstrap 95% interval. The load generator "
            "shares the 2 cores with the server (the raw engine has them to itself). Issue 21's target is c=32 ≥ "
            "0.9 of the raw engine.")


def hint_lines(hints: dict) -> list[str]:
    """The hint comparison under the served tables: a sentence and a table of rounds."""
    t = hints["throughput_over_latency"]
    text = (f"The two hints alone ({hints['started']}): `{hints['variant']}` opened under each in one process, "
            f"{hints['rounds']} interleaved rounds; THROUGHPUT ÷ LATENCY items/s at batch {hints['batch']} "
            f"{t['items_per_s']['estimate']:.2f}× [{t['items_per_s']['low']:.2f}, {t['items_per_s']['high']:.2f}], "
            f"p50 at batch 1 {t['p50_ms_b1']['estimate']:.2f}× [{t['p50_ms_b1']['low']:.2f}, "
            f"{t['p50_ms_b1']['high']:.2f}] (`benchmarks/plans_served.py`, `compare_hints`):")
    f = hints["found"]
    body = [[r, f"{f['LATENCY']['items_per_s'][r]:.1f}", f"{f['THROUGHPUT']['items_per_s'][r]:.1f}",
             f"{f['LATENCY']['p50_ms_b1'][r]:.1f}", f"{f['THROUGHPUT']['p50_ms_b1'][r]:.1f}"]
            for r in range(hints["rounds"])]
    return [text, table(["round", "LATENCY items/s", "THROUGHPUT items/s", "LATENCY p50 b1 ms",
                         "THROUGHPUT p50 b1 ms"], body)]
