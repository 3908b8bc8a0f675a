import math

from benchmarks import report, targets


def _closed(server, protocol, level, rps, p50, p99, batch=1):
    return {"server": server, "protocol": protocol, "level": level, "batch": batch, "ok": 10, "sent": 10,
            "codes": {"200": 10}, "throughput_rps": rps, "items_per_s": rps * batch, "p50_ms": p50, "p90_ms": p99,
            "p99_ms": p99, "mode": "closed"}


ENGINE_ROWS = [
    {"model": "m", "backend": "onnxruntime", "batch": 1, "variant": "unfused", "exact": True, "rounds": 5,
     "p50_ms": 10.0, "p99_ms": 11.0, "ratio": 1.0, "ratio_low": 1.0, "ratio_high": 1.0, "items_per_s": 100},
    {"model": "m", "backend": "onnxruntime", "batch": 1, "variant": "affine", "exact": True, "rounds": 5,
     "p50_ms": 9.0, "p99_ms": 9.5, "ratio": 0.9, "ratio_low": 0.85, "ratio_high": 0.95, "gain": 0.5,
     "gain_low": 0.3, "gain_high": 0.7, "items_per_s": 111},
    {"model": "m", "backend": "onnxruntime", "batch": 1, "variant": "nonorm", "exact": False, "rounds": 5,
     "p50_ms": 8.0, "p99_ms": 8.5, "ratio": 0.8, "ratio_low": 0.75, "ratio_high": 0.85, "items_per_s": 125},
]
SERVING = {
    "model": "m", "variant": "unfused", "config": {"max_batch_size": 16}, "skipped": {"litserve": "no litserve"},
    "engine": [{"server": "engine", "protocol": "-", "batch": 1, "p50_ms": 2.0, "p99_ms": 3.0, "items_per_s": 500},
               {"server": "engine", "protocol": "-", "batch": 16, "p50_ms": 16.0, "p99_ms": 17.0,
                "items_per_s": 1000}],
    "closed": [_closed("normfuse", "binary", 1, 300, 2.5, 4), _closed("normfuse", "binary", 32, 950, 30, 50),
               _closed("normfuse", "json", 1, 250, 4.5, 6), _closed("normfuse", "binary", 4, 60, 60, 70, batch=16),
               _closed("triton", "binary", 1, 200, 3.0, 5), _closed("triton", "binary", 32, 900, 35, 60),
               _closed("plain", "binary", 32, 400, 70, 90)],
    "open": [],
}


def test_targets_met_missed_and_not_measured():
    verdicts = {t.goal: t for t in targets.evaluate(ENGINE_ROWS, SERVING, 16)}
    gain = next(t for g, t in verdicts.items() if "80%" in g)
    assert gain.met is False and "50%" in gain.measured
    assert next(t for g, t in verdicts.items() if "never slower" in g).met is True
    binary = next(t for g, t in verdicts.items() if "(binary) to the engine" in g)
    json = next(t for g, t in verdicts.items() if "(json) to the engine" in g)
    assert binary.met is True and "+0.50 ms" in binary.measured
    assert json.met is False and "+2.50 ms" in json.measured
    assert next(t for g, t in verdicts.items() if "90%" in g).met is True  # 60 × 16 = 960 vs 1000 items/s
    assert next(t for g, t in verdicts.items() if "Triton" in g).met is True
    litserve = next(t for g, t in verdicts.items() if "LitServe" in g)
    assert litserve.met is None and litserve.verdict == "not measured" and "no litserve" in litserve.measured
    assert next(t for g, t in verdicts.items() if "3×" in g).met is False  # 950 / 400 = 2.4
    assert len(verdicts) == 8  # every goal is distinct


def test_gain_target_without_bound_is_not_met():
    rows = [dict(r, gain=math.nan) if "gain" in r else r for r in ENGINE_ROWS]
    t = targets.gain_target(rows)
    assert t.met is None and "no measurable gain" in t.measured


def test_throughput_at_p99():
    rows = [_closed("n", "json", c, rps, 1, p99) for c, rps, p99 in ((1, 100, 5), (4, 300, 20), (16, 500, 80))]
    assert targets.throughput_at_p99(rows, 25) == 300
    assert targets.throughput_at_p99(rows, 1) == 0


def test_report_writes_tables_plots_and_verdicts(tmp_path):
    out = report.write(tmp_path / "BENCHMARKS.md", {"rows": ENGINE_ROWS, "skipped": {"m/tensorrt": "no GPU"}},
                       SERVING, plot_dir=tmp_path / "plots", command="make bench")
    text = out.read_text()
    assert "## Machine" in text and "onnxruntime" in text
    assert "| m | onnxruntime | 1 | affine | yes | 5 | 9.00 | 9.50 | 0.900 [0.850, 0.950] | 50% [30%, 70%] |" in text
    assert "skipped m/tensorrt: no GPU" in text and "skipped server litserve: no litserve" in text
    assert "| normfuse | binary | 2.50 | 950 | 32 | 50.00 |" in text  # at a glance
    assert "| 1 | 2.00 | 2.50 (+0.50) | 4.50 (+2.50) | – | 3.00 (+1.00) |" in text  # overhead at c=1, batch 1
    assert "| missed |" in text and "| met |" in text and "| not measured |" in text
    for png in ("latency_vs_batch.png", "ratio_ci.png", "throughput_vs_concurrency.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"(plots/{png})" in text
