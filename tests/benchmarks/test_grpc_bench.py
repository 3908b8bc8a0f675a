"""`normfuse bench grpc` / `grpc-report`: the comparison's arithmetic, and a quick real run rendered into a
BENCHMARKS.md between its markers (counts only: tests do not judge speed)."""

import importlib.util
import json

import pytest

from benchmarks.grpc_bench import GRPC, REST, TRITON, summarize_rounds
from benchmarks.grpc_report import GRPC_BEGIN, GRPC_END, verdicts
from tests.process import normfuse


def row(round_, label, level, p50, rps):
    return {"round": round_, "label": label, "level": level, "p50_ms": p50, "p99_ms": 2 * p50,
            "throughput_rps": rps, "codes": {"200": 10}}


def test_comparisons_are_within_a_round_and_their_medians_judge_the_targets():
    rows = [row(0, REST, 1, 1.0, 900), row(0, GRPC, 1, 1.2, 800), row(0, TRITON, 1, 3.0, 300),
            row(1, REST, 1, 2.0, 500), row(1, GRPC, 1, 2.9, 350),      # a noisy round: both slower
            row(2, REST, 1, 1.0, 900), row(2, GRPC, 1, 1.1, 850),
            row(0, REST, 32, 40.0, 600), row(0, GRPC, 32, 20.0, 1200),
            row(1, REST, 32, 80.0, 300), row(1, GRPC, 32, 45.0, 540)]
    summary = summarize_rounds(rows, (1, 32))
    c1, c32 = summary["1"], summary["32"]
    assert c1["grpc_minus_rest_p50_ms"]["rounds"] == pytest.approx([0.2, 0.9, 0.1])
    assert c1["grpc_minus_rest_p50_ms"]["median"] == pytest.approx(0.2)
    assert c1["medians"][GRPC]["p50_ms"] == pytest.approx(1.2) and c1["medians"][TRITON]["throughput_rps"] == 300
    assert c32["grpc_over_rest_rps"]["rounds"] == pytest.approx([2.0, 1.8]) and TRITON not in c32["medians"]
    result = {"summary": summary}
    assert [v[-1] for v in verdicts(result)] == ["met", "met"]
    summary["1"]["grpc_minus_rest_p50_ms"]["median"] = 0.6  # more than 0.5 ms behind REST
    summary["32"]["grpc_over_rest_rps"]["median"] = 0.97
    assert [v[-1] for v in verdicts(result)] == ["not met", "not met"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_quick_run_measures_every_target_and_renders_its_section_in_place(bench_repo, tmp_path):
    triton = importlib.util.find_spec("pytriton") is not None
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "grpc.json"
    out.write_text("# Benchmarks\n\nkept\n\n## Plots\n\nkept too\n")
    done = normfuse("bench", "grpc", "--repo", str(bench_repo), "--model", "tiny", "--quick", "--json", str(results),
                    "--out", str(out), "--plots", str(tmp_path / "plots"), *([] if triton else ["--no-triton"]))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(results.read_text())
    labels = {REST, GRPC} | ({TRITON} if triton else set())
    assert {(r["label"], r["level"]) for r in data["rows"]} == {(label, c) for label in labels for c in (1, 32)}
    assert all(r["sent"] > 0 and r["codes"] == {"200": r["sent"]} for r in data["rows"]), data["rows"]
    assert data["server_settings"]["max_queue_delay_ms"] == 0.0  # the server's defaults, as users get them
    assert data["summary"]["32"]["grpc_over_rest_rps"]["median"] > 0
    text = out.read_text()
    assert text.count(GRPC_BEGIN) == 1 and text.count(GRPC_END) == 1 and "kept" in text and "kept too" in text
    assert text.index(GRPC_BEGIN) < text.index("## Plots") and "shared" in text
    assert (tmp_path / "plots" / "grpc_vs_rest.png").stat().st_size > 10_000
    again = normfuse("bench", "grpc-report", "--results", str(results), "--out", str(out), "--plots",
                     str(tmp_path / "plots"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text() == text  # re-rendered from the JSON alone, in place
