"""BENCHMARKS.md's int8 section: rendered from a results JSON alone, between its markers, targets judged."""

from __future__ import annotations

from benchmarks.int8_bench import SENTENCES, template_sentences
from benchmarks.int8_report import INT8_BEGIN, INT8_END, targets, write_int8


def result(int8_ratio: float = 0.5) -> dict:
    speed = [{"model": "vit-s16", "backend": "onnxruntime", "batch": 8, "variant": v, "exact": v == "rmsnorm",
              "rounds": 6, "p50_ms": 100 * r, "p99_ms": 110 * r, "ratio": r, "ratio_low": r * 0.95,
              "ratio_high": r * 1.05} for v, r in (("unfused", 1.0), ("int8", int8_ratio), ("int8-plain", 0.6))]
    row = {"rel_l2": 0.01, "cosine": 0.9999, "top1_agreement": 1.0, "passed": True, "servable": True, "samples": 256,
           "smoothed_norms": 5, "scaled_norms": 0, "skipped_norms": 0}
    return {
        "config": {"threads": 1, "seq_len": 128}, "notes": ["The machine was shared."], "speed": speed,
        "machine": {"cpu": "test"}, "load_at_end": [1.0, 1.0, 1.0],
        "accuracy": {
            "vit-digits": {"variants": {"int8": row | {"task": 0.962, "unfused_task": 0.964}}},
            "all-minilm-l6-v2": {"sentences": 256, "variants": {"int8": row | {"top1_agreement": None,
                                 "embedding_cosine_median": 0.996, "embedding_cosine_min": 0.99}}},
            "stress": {"outliers": {"channels": [3], "factor": 30.0},
                       "variants": {"int8": row, "int8-plain": row | {"rel_l2": 0.1, "passed": False}}},
        },
    }


def test_targets_are_judged_from_the_figures():
    lines = targets(result(0.5))
    assert any("vit-s16: 2.00×" in line and "met" in line for line in lines)
    assert any("+0.20 points lost" in line and "**met**" in line for line in lines)
    assert any("0.99600" in line and "**met**" in line for line in lines)
    assert any("0.100 ×" in line and "**met**" in line for line in lines)
    assert any("vit-s16: 1.25×" in line and "**missed**" in line for line in targets(result(0.8)))


def test_the_section_replaces_itself_between_its_markers_and_keeps_the_rest(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nbefore\n")
    write_int8(out, result(), plot_dir=tmp_path / "plots")
    write_int8(out, result(0.4), plot_dir=tmp_path / "plots")
    text = out.read_text()
    assert text.count(INT8_BEGIN) == 1 and text.count(INT8_END) == 1 and text.startswith("# Benchmarks\n\nbefore")
    assert "2.50×" in text and "| vit-s16 | 8 | int8 |" in text and "The machine was shared." in text
    assert (tmp_path / "plots" / "int8.png").stat().st_size > 0


def test_the_committed_sentences_are_the_generated_ones():
    sentences = SENTENCES.read_text().splitlines()
    assert sentences == template_sentences() and len(set(sentences)) == len(sentences) >= 300
