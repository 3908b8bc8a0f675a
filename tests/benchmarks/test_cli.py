"""`normfuse bench all --quick` and `normfuse loadgen` end to end, with the real `normfuse serve` on loopback."""

import json

import pytest

from benchmarks.peers import launch
from tests.process import normfuse


@pytest.mark.e2e
def test_bench_all_quick_writes_the_report(bench_repo, tmp_path):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    done = normfuse("bench", "all", "--repo", str(bench_repo), "--quick", "--no-prepare", "--serving-model", "tiny",
                    "--servers", "normfuse,plain", "--out", str(out), "--plots", str(tmp_path / "plots"),
                    "--json", str(results), "--threads", "1", "--skip", "plans,int8,grpc,reload,hostile")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(results.read_text())
    variants = {r["variant"] for r in data["engines"]["rows"]}
    assert variants == {"unfused", "affine", "nonorm"}
    closed = data["serving"]["closed"]
    assert {(r["server"], r["protocol"]) for r in closed} == {("normfuse", "json"), ("normfuse", "binary"),
                                                              ("plain", "json"), ("plain", "binary")}
    assert all(r["codes"] == {"200": r["sent"]} for r in closed)
    assert {r["variant"] for r in data["serving"]["open"]} == {"unfused", "affine"}
    text = out.read_text()
    assert "## Targets" in text and "| normfuse | binary | 4 | 1 |" in text
    # issue 7's table: the trained LN / UN / PN demo models, folded, with the no-norm bound
    assert "## Trained-in norms" in text and "| UN folded |" in text and "| no-norm bound" in text
    # the other sections run in their own processes, in the same run; the header says where each came from
    assert "<!-- overload:begin -->" in text and "| overload | measured in " in text
    assert "| plans | not measured (no results file) |" in text and "| engines | measured in " in text
    assert "cpu flags that pick plans" in text
    assert json.loads((bench_repo.parent / "results" / "overload.json").read_text())


def test_bench_all_refuses_an_unknown_section(tmp_path):
    done = normfuse("bench", "all", "--repo", str(tmp_path / "repo"), "--no-prepare", "--skip", "plans,bogus")
    assert done.returncode == 2 and "bogus" in done.stderr and "hostile" in done.stderr


@pytest.mark.e2e
def test_loadgen_against_the_real_server(bench_repo, tmp_path):
    with launch.start("normfuse", log_dir=tmp_path, repo=str(bench_repo), max_batch_size=4) as server:
        report = tmp_path / "load.json"
        done = normfuse("loadgen", server.base_url, "--model", "tiny", "--variants", "all", "--protocol", "json",
                        "--concurrency", "1,2", "--rates", "20", "--max-requests", "10", "--max-seconds", "5",
                        "--json", str(report), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(report.read_text())["results"]
    # every servable variant (not the benchmark-only bound), two closed steps and one open step each
    assert sorted({r["label"] for r in results}) == ["affine", "unfused"]
    assert [r["mode"] for r in results] == ["closed", "closed", "open"] * 2
    assert all(r["codes"] == {"200": 10} for r in results)
    assert "unfused" in done.stdout and "p99" in done.stdout


@pytest.mark.parametrize("quick", [False, True])
def test_every_section_command_parses_for_measuring_and_for_rendering(tmp_path, quick):
    """What `bench all` runs for each section, measured or re-rendered (--skip), is a command the CLI accepts, and
    it writes to this run's report and results."""
    import argparse

    from benchmarks import one_run
    from normfuse.cli import build_parser

    args = argparse.Namespace(repo=tmp_path / "repo", serving_model="tiny", out=tmp_path / "B.md",
                              plots=tmp_path / "plots", quick=quick)
    parser = build_parser()
    for section in one_run.SECTIONS:
        for measure in (True, False):
            parsed = parser.parse_args(["bench", *one_run.argv_for(section, args, measure=measure)])
            assert parsed.handler is not None and parsed.out == args.out, (section.name, measure)
            results = one_run.results_dir(args) / f"{section.name}.json"
            given = {getattr(parsed, key, None) for key in ("json", "results", "render")}
            assert results in given, (section.name, measure, given)
