"""BENCHMARKS.md's GPU section (between GPU_BEGIN / GPU_END) and its plot, rendered from `gpu-check`'s results
JSON alone, so the device run's JSON can be rendered on any machine and the section merges beside the others."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.report import _interval, _num, splice, table

GPU_BEGIN, GPU_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
TITLE = "## GPU: fused vs unfused vs UN-folded in torch (eager, torch.compile, bf16)"


def rows_table(rows: list[dict]) -> str:
    return table(
        ["model", "stage", "batch", "variant", "exact", "rounds", "p50 ms", "÷ unfused [95% CI]",
         "gain captured [95% CI]", "rel-L2 vs fp32 reference", "first call s"],
        [[r["model"], r["stage"], r["batch"], r["variant"], "yes" if r["exact"] else "no (bound)", r["rounds"],
          _num(r["p50_ms"], ".3f"), _interval(r, "ratio", ".3f"), _interval(r, "gain", ".0%"),
          _num(r.get("rel_l2"), ".1e"), _num(r.get("compile_s"), ".1f")] for r in rows])


def verdicts(rows: list[dict]) -> list[str]:
    """One line per stage × model × batch: which variants are significantly faster or slower than unfused."""
    lines = []
    groups = sorted({(r["model"], r["stage"], r["batch"]) for r in rows}, key=str)
    for model, stage, batch in groups:
        group = [r for r in rows if (r["model"], r["stage"], r["batch"]) == (model, stage, batch)
                 and r["variant"] != "unfused"]
        faster = [f"{r['variant']} {r['ratio']:.3f}" for r in group if r.get("ratio_high", 1) < 1]
        slower = [f"{r['variant']} {r['ratio']:.3f}" for r in group if r.get("ratio_low", 1) > 1]
        lines.append(f"- {model} {stage} b{batch}: faster than unfused (interval below 1): "
                     f"{', '.join(faster) or 'none'}; slower (interval above 1): {', '.join(slower) or 'none'}")
    return lines


def section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    env, cfg = result["environment"], result["config"]
    head = ("**Dry run** — tiny models (2 layers, width 32) for a few rounds: it checks that every step runs, "
            "its numbers are not figures. " if result["dry_run"] else "")
    parts = [head + f"Measured by `make gpu-check` (`python -m benchmarks.gpu_check`) at {result['started']} in "
             f"{result['wall_s']:.0f} s on **{env['device']}** (torch {env['torch']}, CUDA {env['cuda']}, "
             f"transformers {env.get('transformers', '?')}, TF32 matmul {env['tf32 matmul']}, torch.compile backend "
             f"`{cfg['compile_backend']}`" + (f", driver {env['driver']}" if env.get("driver") else "") + "). "
             + (f"Tiny stand-ins (2 layers, width 32, 32² images, sequence {cfg['seq_len']}) of ViT-S/16 and "
                "GPT-2-small" if result["dry_run"] else
                f"ViT-S/16 at 224² and GPT-2-small at sequence {cfg['seq_len']}") + ", random weights from their HF configs "
             "(random LayerNorm γ/β; GPT-2's head untied), SDPA attention; variants built by `convert.rewrite`. "
             "`un-folded` replaces every LayerNorm by an eval-mode Unified Normalization with random running "
             "statistics and folds it away (`folded`): a different function, timed as what a UN-trained model costs; "
             "its rel-L2 is against the unfolded UN model. `nonorm` (every norm removed) is the bound, not exact. "
             f"Interleaved rounds (up to {cfg['rounds']}), each sample ≥ {cfg['min_sample_s'] * 1e3:g} ms of "
             f"back-to-back calls (at least one) timed with {'CUDA events' if cfg['device'].startswith('cuda') else 'perf_counter'}; "
             "ratios of medians with paired bootstrap 95% intervals; "
             "`first call s` is the compile time of a compiled stage.",
             rows_table(result["rows"]), "\n".join(verdicts(result["rows"]))]
    build = ", ".join(f"{m} {s:.0f} s" for m, s in result.get("build_s", {}).items())
    notes = [f"building the variants (on the host CPU): {build}"] if build else []
    notes += result.get("notes", [])
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    if plot is not None:
        rel = os.path.relpath(plot, out_dir) if out_dir is not None else str(plot)
        parts.append(f"![variant ÷ unfused per stage]({Path(rel).as_posix()})")
    return "\n\n".join(parts)


def plot(result: dict, path: Path) -> Path | None:
    from benchmarks import plots

    rows = [{**r, "model": f"{r['model']} {r['stage']}"} for r in result["rows"]]
    return plots.ratio_with_interval(rows, path)


NOT_MEASURED = ("Not measured yet: no GPU was lent to the session that wrote `make gpu-check` (issue 21). On a CUDA "
                "machine, `make gpu-check` (≤ 8 minutes on one H100, torch + transformers only) replaces this section "
                "with its table: unfused / affine / rmsnorm / un-folded / nonorm ViT-S/16 and GPT-2-small in eager "
                "fp32, eager bf16, torch.compile bf16 and fp32, with the device recorded. How to run it on a lent "
                "machine: [docs/benchmarks.md](docs/benchmarks.md#gpu-check). CI runs its CPU dry run "
                "(`tests/benchmarks/test_gpu_check.py`).")


def keep(out: Path, *, plot_dir: Path, results: Path = Path("benchmarks/results/gpu_check.json")) -> Path:
    """`bench all` rewrites BENCHMARKS.md: put the GPU section back, from the committed device run's results, or
    the line that says it has not been measured."""
    import json

    if Path(results).is_file():
        return write(out, json.loads(Path(results).read_text()), plot_dir=plot_dir)
    return splice(Path(out), GPU_BEGIN, GPU_END, f"{GPU_BEGIN}\n{TITLE}\n\n{NOT_MEASURED}\n{GPU_END}")


def write(out: Path, result: dict, *, plot_dir: Path) -> Path:
    """Replace (or add) the GPU section of `out`, and its plot in `plot_dir`."""
    out = Path(out)
    picture = plot(result, Path(plot_dir) / "gpu_check.png")
    block = f"{GPU_BEGIN}\n{TITLE}\n\n{section(result, picture, out.parent)}\n{GPU_END}"
    return splice(out, GPU_BEGIN, GPU_END, block)
