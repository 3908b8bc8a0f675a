"""`normfuse bench gpu-check --dry-run` end to end on the CPU: tiny ViT and GPT-2, every stage, the section written."""

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_check_report import GPU_BEGIN, GPU_END
from benchmarks.gpu_models import VARIANTS
from tests.process import ROOT, normfuse


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    out, results = tmp / "BENCHMARKS.md", tmp / "gpu.json"
    out.write_text("# Benchmarks\n\n## Machine\n\nkept\n\n## Plots\n\nkept too\n")
    done = normfuse("bench", "gpu-check", "--dry-run", "--device", "cpu", "--json", str(results), "--out", str(out),
                    "--plots", str(tmp / "plots"), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, results, json.loads(results.read_text())


def test_every_model_stage_and_variant_is_timed(dry_run):
    _, _, result = dry_run
    assert result["dry_run"] and result["environment"]["device"]
    groups = {(r["model"], r["stage"], r["batch"]) for r in result["rows"]}
    assert groups == {(m, s, 2) for m in ("vit-s16", "gpt2-small")
                      for s in ("eager-fp32", "eager-bf16", "compile-bf16", "compile-fp32")}, result["notes"]
    for group in groups:
        rows = {r["variant"]: r for r in result["rows"] if (r["model"], r["stage"], r["batch"]) == group}
        assert set(rows) == set(VARIANTS)
        assert rows["unfused"]["ratio"] == 1.0 and all(r["p50_ms"] > 0 for r in rows.values())
        assert all("compile_s" in r for r in rows.values()) == group[1].startswith("compile")


def test_parity_column_separates_the_exact_variants_from_the_bound(dry_run):
    _, _, result = dry_run
    for r in result["rows"]:
        if r["variant"] == "nonorm":
            assert r["rel_l2"] > 0.1  # every norm removed: a different function, and the column shows it
        elif r["stage"].endswith("fp32"):
            assert r["rel_l2"] < 1e-4, r  # the rewrites are exact in fp32
        else:
            assert r["rel_l2"] < 0.05, r  # bf16: rounding, not a wrong rewrite


def test_the_section_is_spliced_in_and_rerenders_unchanged(dry_run, tmp_path):
    out, results, result = dry_run
    text = out.read_text()
    section = text.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0]
    assert "**Dry run**" in section and result["environment"]["device"] in section
    assert "| gpt2-small | compile-bf16 | 2 | un-folded | yes |" in section
    assert "kept" in text and text.index(GPU_END) < text.index("## Plots")  # before the plots, the rest kept
    assert (out.parent / "plots" / "gpu_check.png").stat().st_size > 0
    done = normfuse("bench", "gpu-check", "--render", str(results), "--out", str(out), "--plots",
                    str(out.parent / "plots"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text() == text


def test_an_unknown_stage_is_a_usage_error_naming_it(tmp_path):
    done = normfuse("bench", "gpu-check", "--dry-run", "--device", "cpu", "--stages", "eager-fp16",
                    "--out", str(tmp_path / "B.md"))
    assert done.returncode == 2 and "eager-fp16" in done.stderr and "compile-bf16" in done.stderr


def test_the_gpu_path_imports_no_server_stack():
    """The lent GPU image has torch and transformers but no pydantic: the check must not need it."""
    code = ("import sys, benchmarks.gpu_check, benchmarks.gpu_models, benchmarks.gpu_check_report, "
            "convert.rewrites.affine, convert.rewrites.pre_rmsnorm, convert.rewrites.folded, oip.stats; "
            "import convert.rewrites.fold_unified; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'engines', 'onnx', 'fastapi')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_bench_all_keeps_the_section(dry_run, tmp_path):
    """`bench all` rewrites BENCHMARKS.md whole; keep() puts the GPU section back from the results, else says why."""
    from benchmarks.gpu_check_report import NOT_MEASURED, keep

    _, results, _ = dry_run
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Plots\n")
    keep(out, plot_dir=tmp_path, results=tmp_path / "missing.json")
    assert NOT_MEASURED in out.read_text() and out.read_text().index(GPU_END) < out.read_text().index("## Plots")
    keep(out, plot_dir=tmp_path, results=results)
    text = out.read_text()
    assert NOT_MEASURED not in text and "**Dry run**" in text and text.count(GPU_BEGIN) == 1


def test_a_spent_budget_skips_stages_and_says_so(tmp_path):
    """The wall budget is what keeps the device run within its 8 minutes: past it nothing starts, and the
    section lists what was skipped instead of failing."""
    from dataclasses import replace

    from benchmarks.gpu_check import dry_run_config, run
    from benchmarks.gpu_check_report import write

    result = run(replace(dry_run_config("cpu"), budget_s=0.0, models=("vit-s16",)))
    assert result["rows"] == []
    assert [n.split(":")[0] for n in result["notes"]] == [f"vit-s16 {s}" for s in
                                                          ("eager-fp32", "eager-bf16", "compile-bf16", "compile-fp32")]
    text = write(tmp_path / "B.md", result, plot_dir=tmp_path).read_text()
    assert "vit-s16 compile-fp32: skipped" in text
