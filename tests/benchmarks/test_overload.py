"""`normfuse bench overload --quick` end to end on a tiny repository (a smoke run of the machinery, no timing
asserted): every step runs against real server processes on 127.0.0.1, the flood's answers are only 200, 4xx
or 503, the large requests are served, and the section renders between its markers and re-renders alone."""

import json

import pytest

from benchmarks import overload_report
from benchmarks.overload_bench import targets
from tests.benchmarks.conftest import build_bench_repo
from tests.process import normfuse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_quick_overload_run_and_its_report(tmp_path):
    repo = build_bench_repo(tmp_path / "repo")
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "overload.json"
    out.write_text("# Benchmarks\n\nkept before\n")
    run = normfuse("bench", "overload", "--repo", str(repo), "--model", "tiny", "--quick", "--json", str(results),
                   "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(results.read_text())
    flood = result["overload"]
    assert set(flood["all_codes"]) <= {"200", "400", "503"}, flood["all_codes"]
    assert flood["codes"]["malformed"].get("200", 0) == 0 and flood["codes"]["malformed"].get("400", 0) > 0
    assert flood["codes"]["big"].get("200", 0) > 0  # a request larger than a batch is served, not refused
    assert result["defaults"]["triton_c1"]["n"] == 30
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n") and text.count(overload_report.BEGIN) == 1
    assert "machine was shared with other jobs" in text
    assert all(name in text for name in targets(result))

    rendered = normfuse("bench", "overload", "--report-only", "--json", str(results), "--out", str(out))
    assert rendered.returncode == 0 and out.read_text() == text  # re-rendered from the JSON, nothing else moved
