"""Accuracy and ONNX Runtime CPU latency of LN / UN / PowerNorm vit-digits variants (docs/un-powernorm.md).

    .venv/bin/python benchmarks/un_powernorm.py [--rounds 30] [--iters 50] [--threads 1]

Every variant is exported with the conversion pipeline's exporter (TorchScript, opset 17, dynamic batch),
loaded into an ORT_ENABLE_ALL CPU session, and timed on the same held-out batch. Runs are interleaved:
each round times every variant once (`iters` calls, median per call), in an order rotated each round;
the figure reported is the median over rounds. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

from convert import NotApplicable, rewrite
from convert.export import export_onnx, ort_session
from convert.models import vit_digits as vd

NORM_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization", "ReduceMean", "Pow", "Sqrt")


def variants() -> list[tuple[str, object, object]]:
    """(label, source, model) for each variant; a rewrite that refuses is reported and skipped."""
    ln, un, pn = vd.vit_digits(), vd.vit_digits_un(), vd.vit_digits_pn()
    wanted = [("LN (vit-digits)", ln, None), ("LN → rmsnorm", ln, "rmsnorm"), ("UN (unfolded)", un, None),
              ("UN folded", un, "folded"), ("PN (unfolded)", pn, None), ("PN folded (affine)", pn, "folded"),
              ("no-norm bound (LN → nonorm)", ln, "nonorm")]
    out = []
    for label, source, variant in wanted:
        try:
            out.append((label, source, source.model if variant is None else rewrite(source.model, variant)))
        except (NotApplicable, ImportError) as exc:
            print(f"| {label} | skipped: {exc} |")  # noqa: T201 - a script's output
    return out


def time_sessions(sessions: dict[str, object], images, rounds: int, iters: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for name in names:  # warm-up
        for _ in range(5):
            sessions[name].run(None, {"images": images})
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            session, calls = sessions[name], []
            for _ in range(iters):
                start = time.perf_counter()
                session.run(None, {"images": images})
                calls.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(calls))
    return {name: 1e3 * statistics.median(values) for name, values in per_round.items()}


def measure(rounds: int = 30, iters: int = 50, threads: int = 1) -> str:
    """Accuracy and interleaved ORT latency at batch 1 and 8 of every variant, as a Markdown table."""
    built = variants()
    with tempfile.TemporaryDirectory() as tmp:
        sessions, accuracy, ops = {}, {}, {}
        for i, (label, source, model) in enumerate(built):
            accuracy[label] = source.evaluate(model)["test_accuracy"]
            # a copy: the exporter may leave the module it is given in training mode
            path = export_onnx(copy.deepcopy(model), source.sample_inputs(2), Path(tmp) / f"{i}.onnx",
                               inputs=source.inputs, outputs=source.outputs)
            optimized = Path(tmp) / f"{i}.optimized.onnx"
            sessions[label] = ort_session(path, threads=threads, optimized_path=optimized)
            counts = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
            ops[label] = {op: counts[op] for op in NORM_OPS if counts[op]}
        latency = {b: time_sessions(sessions, built[0][1].sample_inputs(b)["images"], rounds, iters)
                   for b in (1, 8)}
    base = latency[1]["LN (vit-digits)"], latency[8]["LN (vit-digits)"]
    lines = [f"ORT CPU, {threads} thread(s), {rounds} interleaved rounds × {iters} calls, medians.", "",
             "| variant | test accuracy | batch 1 (ms) | vs LN | batch 8 (ms) | vs LN | norm ops after ORT optimization |",
             "|---|---|---|---|---|---|---|"]
    for label in sessions:
        l1, l8 = latency[1][label], latency[8][label]
        norm_ops = ", ".join(f"{k} {v}" for k, v in ops[label].items()) or "none"
        lines.append(f"| {label} | {accuracy[label]:.4f} | {l1:.4f} | {l1 / base[0] - 1:+.1%} | {l8:.4f} | "
                     f"{l8 / base[1] - 1:+.1%} | {norm_ops} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(measure(args.rounds, args.iters, args.threads))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
