"""`normfuse bench before-after --quick` end to end with both trees = this repository (a smoke run of the
machinery, no timing asserted): two real server processes, each checked to run the tree it was given, every
scenario measured in every turn, ratios computed for every measure, and the section rendered between its markers
(and re-rendered alone from the JSON)."""

import json
import math

import pytest

from benchmarks import before_after, before_after_report
from tests.benchmarks.conftest import build_bench_repo
from tests.process import ROOT, normfuse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_quick_before_after_against_two_copies_of_this_tree(tmp_path):
    repo = build_bench_repo(tmp_path / "repo")
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "before_after.json"
    out.write_text("# Benchmarks\n\nkept before\n")
    run = normfuse("bench", "before-after", "--old", str(ROOT), "--new", str(ROOT), "--repo", str(repo),
                   "--model", "tiny", "--quick", "--json", str(results), "--out", str(out), timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(results.read_text())
    for name in (before_after.OLD, before_after.NEW):
        assert set(result["trees"][name]["imports_from"].values()) == {str(ROOT)}
        assert [t["round"] for t in result["turns"][name]] == [0, 1]
        assert all(t["flood_codes"]["small"].get("200", 0) > 0 for t in result["turns"][name])
        assert all(set(codes) == {"200"} for t in result["turns"][name] for codes in t["step_codes"].values())
    assert set(result["ratios"]) == {key for key, *_ in before_after.METRICS}
    for key, r in result["ratios"].items():
        assert math.isfinite(r["ratio"]) and r["low"] <= r["ratio"] <= r["high"], (key, r)
        old = [t[key] for t in result["turns"]["old"]]
        assert r["old"] == pytest.approx(sorted(old)[0] + (sorted(old)[1] - sorted(old)[0]) / 2)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept before\n") and text.count(before_after_report.BEGIN) == 1
    assert before_after_report.TITLE in text and "new ÷ old [95% CI]" in text
    assert all(measure in text for _, _, measure, _ in before_after.METRICS)

    rendered = normfuse("bench", "before-after", "--report-only", "--json", str(results), "--out", str(out))
    assert rendered.returncode == 0 and out.read_text() == text  # re-rendered from the JSON, nothing else moved


def test_a_tree_whose_code_would_not_run_is_refused(tmp_path):
    (tmp_path / "oip").mkdir()  # a tree without normfuse/ or service/: a server there would run other code
    with pytest.raises(RuntimeError, match="would import|failed"):
        before_after.describe_tree(tmp_path)


def test_measuring_needs_old_and_repo(tmp_path):
    run = normfuse("bench", "before-after", "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "B.md"))
    assert run.returncode == 2 and "--repo and --old are required" in run.stderr
