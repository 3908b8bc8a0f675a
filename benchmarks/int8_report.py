"""BENCHMARKS.md's int8 section (between INT8_BEGIN / INT8_END) and its plot, rendered from `normfuse bench int8`'s
results JSON alone, so it can be re-rendered without re-running and merges beside the other sections."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import _num, splice, table

INT8_BEGIN, INT8_END = "<!-- int8:begin -->", "<!-- int8:end -->"
TARGET_SPEEDUP, TARGET_ACCURACY_DROP, TARGET_COSINE, TARGET_ERROR_RATIO = 1.8, 0.005, 0.99, 0.5


def speed_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        speedup = 1 / r["ratio"] if r.get("ratio") else None
        interval = (f"{_num(1 / r['ratio_high'])}–{_num(1 / r['ratio_low'])}" if r.get("ratio_low") else "–")
        body.append([r["model"], r["batch"], r["variant"], _num(r["p50_ms"], ".1f"), _num(r["p99_ms"], ".1f"),
                     _num(r.get("ratio"), ".3f"), f"{_num(speedup)}× ({interval})", r["rounds"]])
    return table(["model", "batch", "variant", "p50 ms", "p99 ms", "time ÷ unfused", "speed-up (95% CI)", "rounds"],
                 body)


def accuracy_table(accuracy: dict) -> str:
    body = []
    for case, res in accuracy.items():
        for name, row in res["variants"].items():
            task = (f"{_num(row['unfused_task'] * 100, '.2f')} → {_num(row['task'] * 100, '.2f')}"
                    if "task" in row else "–")
            emb = (f"{_num(row['embedding_cosine_median'], '.5f')} (min {_num(row['embedding_cosine_min'], '.4f')})"
                   if "embedding_cosine_median" in row else "–")
            body.append([case, name, _num(row["rel_l2"], ".4f"), _num(row["cosine"], ".6f"),
                         _num(row["top1_agreement"], ".4f"), task, emb,
                         f"{row['smoothed_norms']} / {row.get('scaled_norms', 0)} / {row['skipped_norms']}",
                         "passed" if row["passed"] else "failed"])
    return table(["model", "variant", "rel-L2 vs unfused", "cosine", "top-1 agreement", "test accuracy % (unfused → v)",
                  "embedding cosine median", "norms: γ-folded / explicit 1/s / left", "gate"], body)


def targets(result: dict) -> list[str]:
    lines = []
    for r in result.get("speed", []):
        if r["variant"] == "int8" and r["batch"] == 8 and r.get("ratio"):
            ok = 1 / r["ratio"] >= TARGET_SPEEDUP
            lines.append(f"- int8 ≥ {TARGET_SPEEDUP}× faster than unfused at batch 8, {r['model']}: "
                         f"{1 / r['ratio']:.2f}× — **{'met' if ok else 'missed'}**")
    acc = result.get("accuracy", {})
    row = acc.get("vit-digits", {}).get("variants", {}).get("int8")
    if row and "task" in row:
        drop = row["unfused_task"] - row["task"]
        lines.append(f"- vit-digits int8 test accuracy within 0.5 point of unfused: {drop * 100:+.2f} points lost — "
                     f"**{'met' if drop <= TARGET_ACCURACY_DROP + 1e-12 else 'missed'}**")
    row = acc.get("all-minilm-l6-v2", {}).get("variants", {}).get("int8")
    if row:
        cos = row["embedding_cosine_median"]
        lines.append(f"- all-MiniLM-L6-v2 int8 median embedding cosine ≥ {TARGET_COSINE}: {cos:.5f} — "
                     f"**{'met' if cos >= TARGET_COSINE else 'missed'}**")
    stress = acc.get("stress", {}).get("variants", {})
    if "int8" in stress and "int8-plain" in stress:
        ratio = stress["int8"]["rel_l2"] / stress["int8-plain"]["rel_l2"]
        lines.append(f"- outlier stress model: int8 error ≤ {TARGET_ERROR_RATIO} × int8-plain's: "
                     f"{ratio:.3f} × — **{'met' if ratio <= TARGET_ERROR_RATIO else 'missed'}**")
    return lines


def int8_section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    parts = ["Lossy variants, built only when asked for (`normfuse convert SRC --variants unfused,rmsnorm,int8,int8-plain`):"
             " `int8` = the `smoothed` reparameterization (per-channel scales moved from each norm's γ/β into its "
             "linear readers, exact) then ONNX Runtime static QDQ int8 (per-channel int8 weights, per-tensor uint8 "
             "activations, norms and softmax in float); `int8-plain` = the same quantization without smoothing. "
             "Rendered from `benchmarks/results/int8.json` by `normfuse bench int8-report`; measured by "
             "`normfuse bench int8`. "
             + " ".join(result.get("notes", [])), "", "**Targets**", "", *targets(result), ""]
    if result.get("speed"):
        cfg = result["config"]
        parts += [f"### Speed (random weights, ONNX Runtime CPU, {cfg['threads']} intra-op thread, interleaved rounds, "
                  f"sequence {cfg['seq_len']} for GPT-2)", "", speed_table(result["speed"]), ""]
    if result.get("accuracy"):
        acc = result["accuracy"]
        stress = acc.get("stress", {}).get("outliers", {})
        parts += ["### Accuracy (trained models, held-out data the calibration never saw)", "",
                  accuracy_table(acc), "",
                  "- vit-digits: the 450 test images; calibration on 64 training images; rel-L2/cosine/top-1 on "
                  "256 held-out test images.",
                  f"- all-MiniLM-L6-v2 (the real pretrained model, Post-LN BERT): {acc.get('all-minilm-l6-v2', {}).get('sentences', '?')} "
                  "held-out sentences of `benchmarks/data/sentences.txt` (template sentences, committed), the first 64 "
                  "calibrate. Every LayerNorm output is also the residual stream (Post-LN), so no scale can be folded "
                  "into a γ/β; `int8` gives their linear readers an explicit 1/s instead (one Mul per reader, the same "
                  "function; `--int8-post-ln scale`, the default), the manifest records which norm got which. Its gate "
                  "judges the raw token states (every position, padding included: rel-L2/cosine columns), not the "
                  "pooled embeddings, so a `failed` there means the conversion recorded it and does not serve it.",
                  f"- stress: vit-digits with outlier channels {stress.get('channels')} × {stress.get('factor')} put into "
                  "every Pre-LN norm's output by a function-preserving γ-scaling (γ_j, β_j × factor, the readers' "
                  "column j ÷ factor: the same function as vit-digits).", ""]
    if plot is not None:
        rel = plot.relative_to(out_dir) if out_dir is not None and plot.is_relative_to(out_dir) else plot
        parts += [f"![int8 vs exact]({rel.as_posix()})", ""]
    machine = result.get("machine", {})
    if machine:
        keys = ("cpu", "logical cores", "memory", "onnxruntime", "torch")
        parts += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items() if "load" in k or k in keys) + ".", ""]
    return "\n".join(parts)


def plot_int8(result: dict, path: Path) -> Path | None:
    from benchmarks import plots

    plt = plots.plt
    speed_rows = [r for r in result.get("speed", []) if r.get("ratio") and r["variant"] != "unfused"]
    acc = result.get("accuracy", {})
    if not speed_rows and not acc:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({f"{r['model']} b{r['batch']}" for r in speed_rows})
    variants = sorted({r["variant"] for r in speed_rows})
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        got = {f"{r['model']} b{r['batch']}": 1 / r["ratio"] for r in speed_rows if r["variant"] == v}
        left.bar([j + i * width for j in range(len(labels))], [got.get(lab, 0) for lab in labels], width, label=v)
    left.axhline(1.0, color="black", lw=0.8)
    left.axhline(TARGET_SPEEDUP, color="red", lw=0.8, ls="--", label=f"target {TARGET_SPEEDUP}× (int8, b8)")
    left.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(labels))], labels)
    left.set_ylabel("speed-up over unfused (×)")
    left.set_title("Speed, ORT CPU 1 thread (higher is better)")
    left.legend(fontsize=8)
    cases = list(acc)
    for i, name in enumerate(("int8", "int8-plain")):
        rows = [acc[c]["variants"].get(name, {}) for c in cases]
        # 1 − cosine to unfused: of the outputs, or of the sentence embeddings where the model makes them
        values = [1 - r.get("embedding_cosine_median", r.get("cosine", 1.0)) for r in rows]
        right.bar([j + i * 0.4 for j in range(len(cases))], values, 0.4, label=name)
    right.set_xticks([j + 0.2 for j in range(len(cases))], cases)
    right.set_yscale("log")
    right.set_ylabel("1 − cosine to unfused (log)")
    right.set_title("Error on held-out data, lower is better\n(MiniLM: median over sentence embeddings)", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return plots._save(fig, path)


def write_int8(out: Path, result: dict, *, plot_dir: Path) -> Path:
    """Replace (or append) the int8 section of `out`; writes the plot into `plot_dir`."""
    out = Path(out)
    plot = plot_int8(result, Path(plot_dir) / "int8.png")
    block = f"{INT8_BEGIN}\n## int8: lossy, gated, ~2× on CPU\n\n{int8_section(result, plot, out.parent)}\n{INT8_END}"
    return splice(out, INT8_BEGIN, INT8_END, block)
