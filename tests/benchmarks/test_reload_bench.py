"""`normfuse bench reload`: the analysis on known samples, a short real run against the tiny test model, and the
section rendered from the committed results into a BENCHMARKS.md without touching the rest."""

import json
from pathlib import Path

import pytest

from benchmarks import reload_bench
from benchmarks.loadgen import Sample
from tests.process import ROOT, normfuse
from tests.service.repo_builder import MODEL, build_test_repo


def test_analyse_splits_requests_by_swap_window():
    t0 = 100.0
    samples = [Sample(t0 + t, t0 + t + latency, status) for t, latency, status in
               [(0.1, 0.010, "200"), (1.1, 0.050, "200"), (1.4, 0.070, "200"), (2.5, 0.012, "200"),
                (2.6, 0.0, "503")]]
    swaps = [{"renamed": 1.0, "serving": 1.3, "closed": 1.5, "revision": "r2"}]
    result = reload_bench.analyse(samples, swaps, t0)
    assert (result["sent"], result["failed"], result["codes"]) == (5, 1, {"200": 4, "503": 1})
    assert result["swapping"]["n"] == 2 and result["steady"]["n"] == 2
    assert result["swapping"]["p50_ms"] == pytest.approx(60.0)
    assert result["load_s"]["p50_ms"] == pytest.approx(300.0) and result["drain_s"]["p50_ms"] == pytest.approx(200.0)
    assert [row[0] for row in result["timeline"]] == [0.0, 1.0, 1.25, 2.5]


@pytest.mark.timeout(180)
def test_a_short_run_swaps_without_failed_requests(tmp_path):
    repo = build_test_repo(tmp_path / "repo", broken=False)
    config = reload_bench.ReloadConfig(model=MODEL, swaps=2, gap_s=1.5, poll_s=0.2, concurrency=2,
                                       log_dir=tmp_path / "logs")
    result = reload_bench.run(repo, config)
    assert result["failed"] == 0 and result["sent"] > 20, result["codes"]
    assert all(s["serving"] is not None for s in result["swaps"])
    assert len({s["revision"] for s in result["swaps"]}) == 2
    assert result["settings"]["max_queue_delay_ms"] == 0.0  # the server's defaults, as `normfuse serve` has them


def test_render_from_the_committed_results_keeps_the_rest(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n\n## Plots\n\nplots\n")
    results = ROOT / "benchmarks/results/reload.json"
    for _ in range(2):  # rendering twice replaces the section, never duplicates it
        done = normfuse("bench", "reload", "--render", str(results), "--out", str(out), "--plots", str(tmp_path))
        assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.count(reload_bench.RELOAD_BEGIN) == 1 and "kept" in text and text.index("## Model reload") < \
        text.index("## Plots")
    committed = json.loads(results.read_text())
    assert f"**{committed['sent']} requests, {committed['failed']} failed**" in text
    assert Path(tmp_path / "reload.png").stat().st_size > 10_000
    assert normfuse("bench", "reload").returncode == 2  # neither --repo nor --render
