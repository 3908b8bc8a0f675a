"""`normfuse bench plans --quick` on the tiny repository: real ONNX Runtime, OpenVINO and NNCF sessions, the table
rendered as BENCHMARKS.md's first section; the CPU peak and FLOP counting they rest on."""

import json

import pytest

from benchmarks.cpu_peak import peak_gflops, per_cycle, read_cpu
from benchmarks.onnx_flops import count_flops, matmul_flops
from benchmarks.plans import Plan
from benchmarks.plans_report import PLANS_BEGIN, PLANS_END
from tests.process import normfuse

PLANS = ("unfused/onnxruntime/fp32,affine/onnxruntime/fp32,rmsnorm/onnxruntime/fp32,unfused/openvino/default,"
         "unfused/openvino/fp32,affine/openvino/bf16,unfused/openvino/int8")


@pytest.fixture(scope="module")
def quick_run(bench_repo, tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    tmp = tmp_path_factory.mktemp("plans")
    out, results = tmp / "BENCHMARKS.md", tmp / "plans.json"
    out.write_text("# Benchmarks\n\nIntro.\n\n## Machine\n\nkept\n")
    done = normfuse("bench", "plans", "--repo", str(bench_repo), "--models", "tiny", "--plans", PLANS, "--quick",
                    "--batch-sizes", "1,8", "--threads", "1,0", "--json", str(results), "--out", str(out),
                    "--plots", str(tmp / "plots"), "--served", "tiny", "--work", str(tmp), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, results, json.loads(results.read_text())


def test_every_plan_is_timed_against_both_baselines(quick_run):
    _, _, result = quick_run
    rows = result["rows"]
    plans = {r["plan"] for r in rows}
    assert plans == set(PLANS.split(",")) - {"rmsnorm/onnxruntime/fp32"}  # the tiny repo has no rmsnorm
    assert any("rmsnorm/onnxruntime/fp32 not run" in n for n in result["notes"])
    assert {(r["batch"], r["threads"]) for r in rows} == {(1, 1), (1, 0), (8, 1), (8, 0)}
    for r in rows:
        assert r["p50_ms"] > 0 and r["vs_ort_low"] <= r["vs_ort"] <= r["vs_ort_high"]
        if r["plan"] == "unfused/onnxruntime/fp32":
            assert r["vs_ort"] == 1.0 and r["rel_l2"] == 0.0
        if r["plan"] == "unfused/openvino/default":
            assert r["vs_ov"] == 1.0
        if r["plan"] in ("affine/onnxruntime/fp32", "unfused/openvino/fp32"):
            assert r["rel_l2"] < 1e-5  # exact variant, or the same file at fp32: the same function
    assert {r["precision"] for r in rows if r["engine"] == "openvino"} >= {"f32"}
    flops = {r["batch"]: r["gflops"] * r["p50_ms"] * 1e6 for r in rows}
    assert flops[8] == pytest.approx(8 * flops[1], rel=1e-6)  # one 16×16 Linear per sample, batch-linear


def test_the_section_is_the_first_table_and_rerenders_unchanged(quick_run, tmp_path):
    out, results, result = quick_run
    text = out.read_text()
    assert text.index(PLANS_BEGIN) < text.index("## Machine") and "Intro." in text and "kept" in text
    section = text.split(PLANS_BEGIN, 1)[1].split(PLANS_END, 1)[0]
    assert result["cpu"]["model"] in section and "Peak per core on this CPU" in section
    assert "| tiny | 8 | 1 | unfused/openvino/int8 |" in section
    served = result["served"]  # the real `normfuse serve` at its defaults, REST binary and gRPC, c=1 and c=32
    assert set(served["summary"]) == {"1", "32"} and {r["batch"] for r in served["engine"]} == {1, 16}
    for level in served["summary"].values():
        assert {"normfuse REST binary", "normfuse gRPC"} <= set(level["medians"])
        assert all(m["throughput_rps"] > 0 for m in level["medians"].values())
    assert "| normfuse gRPC | 32 |" in section and "| raw engine, batch 16 |" in section
    assert (out.parent / "plots" / "plans.png").stat().st_size > 0
    done = normfuse("bench", "plans", "--render", "--json", str(results), "--out", str(out), "--plots",
                    str(out.parent / "plots"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text() == text


def test_a_malformed_plan_is_a_usage_error(tmp_path):
    done = normfuse("bench", "plans", "--plans", "unfused/onnxruntime/bf16", "--json", str(tmp_path / "p.json"))
    assert done.returncode == 2 and "ONNX Runtime's CPU provider runs fp32" in done.stderr
    with pytest.raises(ValueError, match="VARIANT/ENGINE/PRECISION"):
        Plan.parse("unfused-openvino")


AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel Xeon\ncpu MHz\t\t: 2000.0\n" \
      "flags\t\t: fma avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n"
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2600.0\n" \
       "flags\t\t: fma avx2 avx512f avx512_vnni avx512_bf16\n"
AVX2 = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Old Xeon\ncpu MHz\t\t: 3000.0\n" \
       "flags\t\t: fma avx2\n"


def test_peaks_follow_the_recorded_flags():
    amx = read_cpu(AMX, "CPU max MHz:  3000.0000\n")
    assert amx.mhz == 3000.0 and amx.mhz_source.startswith("lscpu")
    assert per_cycle(amx) == {"fp32": ("AVX-512 fp32 FMA", 64), "bf16": ("AMX bf16", 1024),
                              "int8": ("AMX int8", 2048)}
    assert peak_gflops(amx, "bf16", 2) == ("AMX bf16", 1024 * 2 * 3.0)
    zen4 = read_cpu(ZEN4, "")
    assert zen4.mhz == 2600.0 and "cpuinfo" in zen4.mhz_source
    assert per_cycle(zen4)["fp32"][1] == 32 and per_cycle(zen4)["bf16"] == ("AVX512-BF16", 64)
    old = per_cycle(read_cpu(AVX2, ""))
    assert old["bf16"][0].endswith("(bf16 emulated)") and old["bf16"][1] == old["fp32"][1] == 32


def test_flops_are_counted_from_the_graph(tiny_onnx):
    assert matmul_flops([4, 3, 5], [5, 7]) == 2 * 4 * 3 * 5 * 7
    assert matmul_flops([2, 1, 3, 5], [4, 5, 6]) == 2 * 2 * 4 * 3 * 5 * 6  # broadcast batch axes
    count = count_flops(tiny_onnx, {"x": [8, 16]})
    assert count.complete and count.flops == 2 * 8 * 16 * 16  # LayerNorm → Linear(16, 16) → GELU
