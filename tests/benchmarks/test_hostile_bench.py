"""`normfuse bench hostile`: its section renders what a result holds (and says which scenarios a run left out),
and `--quick` runs all three scenarios end to end against real server processes at tiny sizes: the normal
requests answered, the tricklers cut with a 408, the JSON answer refused before compute, no server error in the
fuzz, and the section written between its markers and re-rendered from the JSON alone."""

from __future__ import annotations

import json

import pytest

from benchmarks import hostile_report
from tests.process import normfuse

MACHINE = {"cpu": "AMD EPYC", "cpu family/model": "family 25, model 17", "logical cores": "2", "memory": "23.5 GiB",
           "cpu flags": "avx2 avx512f avx512_bf16 avx512_vnni (no AMX)",
           "load average (1/5/15 min) at start": "4.00 4.00 4.00", "load average (1/5/15 min) at end": "3.00 3.00 3.00"}
HELD = {"settings": {"max_inflight": 8, "min_upload_bytes_per_s": 0, "body_timeout_s": 10},
        "normal": {"200": 37, "503": 3}, "tricklers": {"408 Request Timeout (body_timeout_s), connection closed": 100},
        "seconds": 12.5, "ready_after": True, "tracebacks": 0}
LARGE = {"status": 413, "error": "output 'logits' of shape [1, 1024, 50257] would be ...", "seconds": 0.02,
         "rss_before": 120 << 20, "rss_after": 121 << 20, "shape": [1, 1024, 50257], "json_bytes_about": 823_410_688,
         "binary_bytes": 205_852_672, "convert_s": 30.0, "ready_after": True, "tracebacks": 0}
FUZZ = {"sent": {"rest": 7000, "grpc": 3500}, "rest": {"422": 2564, "400": 2061, "404": 2000, "504": 1},
        "grpc": {"INVALID_ARGUMENT": 1495, "NOT_FOUND": 2005}, "server_errors": [], "seconds": 90.0,
        "cpu": {"client_s": 40.0, "server_s": 6.0}, "normal_after": 200, "tracebacks": 0}


def test_the_section_shows_each_scenario_and_its_targets():
    text = hostile_report.section({"machine": MACHINE, "slow-uploads": {"runs": {"held": HELD}},
                                   "large-answer": LARGE, "fuzz": FUZZ})
    assert "family 25, model 17" in text and "avx512_vnni (no AMX)" in text and "4.00 4.00 4.00" in text
    assert "| 37 / 40 (92%) | 200 × 37, 503 × 3 | 100 × 408 Request Timeout (body_timeout_s)" in text
    assert "| 413 | 0.020 s | 120 → 121 MiB | +1.0 MiB |" in text
    assert "| 7000 | 422 × 2564, 400 × 2061, 404 × 2000, 504 × 1 | 0 |" in text  # the 504 shown, not counted
    assert "Server errors: **0**" in text
    assert "≥ 90% of normal requests answered 200 during 100 trickling uploads: **met**" in text
    assert "the 1024-token JSON answer refused in < 1 s: **met**" in text
    assert "zero 5xx over ≥ 10,000 fuzzed requests (10500 sent): **met**" in text

    worse = hostile_report.section({"machine": MACHINE, "fuzz": {**FUZZ, "server_errors": [
        ["REST 500", "/v2/repository/index", '{"error":"RecursionError"}']]}})
    assert "Server errors: **1**\n- REST 500 / /v2/repository/index" in worse and "**NOT met**" in worse
    assert worse.count("Not measured in this run.") == 2  # the scenarios this run left out are said to be


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_quick_run_measures_every_scenario_and_renders(tmp_path):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "hostile.json"
    out.write_text("# Benchmarks\n\nkept before\n")
    run = normfuse("bench", "hostile", "--quick", "--json", str(results), "--out", str(out),
                   "--work", str(tmp_path / "work"), timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(results.read_text())
    held = result["slow-uploads"]["runs"]["held"]
    assert held["normal"] == {"200": 5} and held["ready_after"] and not held["tracebacks"]
    assert sum(held["tricklers"].values()) == 10 and all(k.startswith(("408", "no answer read"))
                                                         for k in held["tricklers"])
    big = result["large-answer"]
    assert big["status"] == 413 and "max_json_response_bytes" in big["error"] and big["ready_after"]
    fuzz = result["fuzz"]
    assert fuzz["sent"] == {"rest": 150, "grpc": 50} and fuzz["server_errors"] == [] and fuzz["normal_after"] == 200
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n") and text.count(hostile_report.BEGIN) == 1
    assert "A --quick smoke run" in text and "Not measured" not in text

    rendered = normfuse("bench", "hostile", "--report-only", "--json", str(results), "--out", str(out))
    assert rendered.returncode == 0 and out.read_text() == text  # re-rendered from the JSON, nothing else moved
