"""`normfuse capacity plan` and `normfuse capacity report` as a user runs them (real subprocesses)."""

import json
import math

import pytest

from benchmarks.capacity_model import QueueFit
from tests.process import normfuse


def _rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[2:] if line.strip()]


def test_plan_with_a_curve_by_hand():
    done = normfuse("capacity", "plan", "--mu", "1000", "--base-ms", "2", "--rate", "1000,100000", "--p99-ms", "50",
                    "--spare", "1")
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    # 1000 req/s at a cap of 0.8 × 1000: 2 replicas (+1); 100k: 125 (+1); both limited by utilisation
    assert [(r[3], r[4], r[5], r[-1]) for r in rows] == [("1000", "2", "3", "utilisation"),
                                                          ("100000", "125", "126", "utilisation")]


def test_plan_refuses_an_slo_below_the_base_latency():
    done = normfuse("capacity", "plan", "--mu", "1000", "--base-ms", "20", "--rate", "100", "--p99-ms", "10")
    assert done.returncode == 3
    assert "SLO 10.00 ms is at or below one replica's p99 at no load (24.61 ms" in done.stderr
    assert "adding replicas cannot meet it" in done.stderr


def test_plan_from_bench_capacity_results(tmp_path):
    results = tmp_path / "capacity.json"
    results.write_text(json.dumps({"fits": {
        "unfused": {"mu": 1000.0, "base_ms": 3.0, "kappa": 1.0, "q": 0.99},
        "rmsnorm": {"mu": 1250.0, "base_ms": 3.0, "kappa": 1.0, "q": 0.99}}}))
    done = normfuse("capacity", "plan", "--results", str(results), "--rate", "10000", "--p99-ms", "50",
                    "--spare", "0")
    assert done.returncode == 0, done.stderr
    replicas = {r[0]: int(r[4]) for r in _rows(done.stdout)}
    assert replicas == {"unfused": 13, "rmsnorm": 10}  # ceil(10000 / 800), ceil(10000 / 1000)
    missing = normfuse("capacity", "plan", "--results", str(results), "--rate", "1", "--p99-ms", "50",
                       "--variants", "crmsnorm")
    assert missing.returncode == 2 and "no curve for ['crmsnorm']" in missing.stderr


def test_plan_fits_a_loadgen_json(tmp_path):
    truth = QueueFit(mu=900, base_s=0.002)
    rows = [{"label": "unfused", "mode": "open", "level": r, "ok": 500, "sent": 500, "throughput_rps": r,
             "p99_ms": truth.latency(r) * 1e3} for r in (100, 300, 500, 700, 800)]
    rows.append({"label": "unfused", "mode": "closed", "level": 32, "ok": 900, "sent": 900,
                 "throughput_rps": 1000.0, "p99_ms": 40.0})
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"url": "http://x", "model": "m", "results": rows}))
    done = normfuse("capacity", "plan", "--results", str(path), "--rate", "9000", "--p99-ms", "10", "--spare", "0")
    assert done.returncode == 0, done.stderr
    (row,) = _rows(done.stdout)
    assert float(row[1]) == pytest.approx(900, abs=2)  # μ recovered from the open-loop points
    assert int(row[4]) == math.ceil(9000 / truth.max_rate(0.01)) and row[-1] == "slo"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert normfuse("capacity", "plan", "--results", str(bad), "--rate", "1", "--p99-ms", "5").returncode == 2


def test_report_replaces_its_own_section_only(tmp_path):
    from benchmarks.capacity_bench import analyse
    from tests.benchmarks.test_capacity_bench import _synthetic

    result = _synthetic({"unfused": QueueFit(mu=1000, base_s=0.003), "rmsnorm": QueueFit(mu=1050, base_s=0.003)},
                        share=0.6)
    result |= {"model": "vit-digits", "fused_why": "test", "started": "2026-01-01 00:00 UTC", "wall_s": 1.0,
               "machine": {"logical cores": "2", "load average (1/5/15 min) at start": "0.1 0.1 0.1"}}
    result |= analyse(result)
    path, out = tmp_path / "capacity.json", tmp_path / "BENCHMARKS.md"
    path.write_text(json.dumps(result, default=str))
    out.write_text("# Benchmarks\n\nintro\n\n## Plots\n\nplots\n")
    for _ in range(2):  # the second run replaces the first section rather than adding another
        done = normfuse("capacity", "report", "--results", str(path), "--out", str(out), "--plots",
                        str(tmp_path / "plots"))
        assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.count("## Capacity") == 1 and text.startswith("# Benchmarks\n\nintro") and text.endswith("plots\n")
    assert "| 100,000 | 50 |" in text and "![p99 vs offered rate" in text
    assert (tmp_path / "plots" / "capacity.png").is_file()
