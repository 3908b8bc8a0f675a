"""The "Issue 24: before/after, one run" section of BENCHMARKS.md, rendered from `normfuse bench before-after`'s
JSON (benchmarks/results/before_after.json) between its own markers through `report.splice`."""

from __future__ import annotations

from pathlib import Path

from benchmarks.before_after import METRICS, NEW, OLD
from benchmarks.report import _num, splice, table

BEGIN, END = "<!-- before-after:begin -->", "<!-- before-after:end -->"
TITLE = "## Issue 24: before/after, one run"


def _tree(result: dict, name: str) -> str:
    t = result["trees"][name]
    commit = f" at `{t['commit']}`" if t.get("commit") else ""
    after = f", {t['commits_after_old']} commits after old" if t.get("commits_after_old") is not None else ""
    return f"`{t['path']}`{commit}{after}{' (with uncommitted changes)' if t.get('changes') else ''}"


def _verdict(r: dict, better: str) -> str:
    if r["within_noise"]:
        return "within noise"
    improved = (r["ratio"] > 1) == (better == "higher")
    return "**better**" if improved else "**worse**"


def _fmt(key: str) -> str:
    return ".3f" if "_ms" in key else ".0f"


def ratio_table(result: dict) -> str:
    rows = []
    for key, scenario, measure, better in METRICS:
        r = result["ratios"][key]
        per_round = ", ".join(f"{t[key]:{_fmt(key)}}/{n[key]:{_fmt(key)}}"
                              for t, n in zip(result["turns"][OLD], result["turns"][NEW], strict=True))
        rows.append([scenario, measure, better, _num(r["old"], _fmt(key)), _num(r["new"], _fmt(key)),
                     f"{_num(r['ratio'], '.3f')} [{_num(r['low'], '.3f')}, {_num(r['high'], '.3f')}]",
                     _verdict(r, better), per_round])
    return table(["scenario", "measure", "better", "old (median)", "new (median)", "new ÷ old [95% CI]", "verdict",
                  "each round, old/new"], rows)


def codes_table(result: dict) -> str:
    """Answers during the floods, every round summed, per tree: 503 is load shedding by design; any other 5xx
    or a dropped connection is a failure."""
    totals = {}
    for name in (OLD, NEW):
        count: dict[str, int] = {}
        for row in result["turns"][name]:
            for per_kind in row["flood_codes"].values():
                for status, n in per_kind.items():
                    count[status] = count.get(status, 0) + n
        totals[name] = count
    statuses = sorted(set(totals[OLD]) | set(totals[NEW]))
    failures = {name: sum(n for s, n in totals[name].items() if not (s in ("200", "503") or s.startswith("4")))
                for name in totals}
    return table(["tree", *statuses, "other 5xx or dropped"],
                 [[name, *[str(totals[name].get(s, 0)) for s in statuses], str(failures[name])] for name in totals])


def target_verdict(result: dict) -> str:
    """Met when every serving measure's interval contains 1; otherwise which are worse, and which better."""
    by = {"**worse**": [], "**better**": []}
    for key, scenario, measure, better in METRICS:
        if scenario != "JSON decode" and not result["ratios"][key]["within_noise"]:
            by[_verdict(result["ratios"][key], better)].append(measure)
    if by["**worse**"]:
        return "**not met**: worse with the new code: " + "; ".join(by["**worse**"]) + "."
    if by["**better**"]:
        return ("**met** (nothing worse); outside noise in the new code's favour: " + "; ".join(by["**better**"])
                + ".")
    return "**met**: every serving measure within noise."


def _how(result: dict) -> str:
    """What ran against what, and how to run it again."""
    c = result["config"]
    return (
        f"Measured by `normfuse bench before-after` at {result['started']} ({result['wall_s']:.0f} s). "
        f"**old** = {_tree(result, OLD)}, **new** = {_tree(result, NEW)}; each server was checked to import "
        "`normfuse`, `oip` and `service` from its own tree. Model `" + result["model"] + "`, one `normfuse serve` "
        f"per tree at that tree's default settings, both up for the whole run; {c['rounds']} rounds, each tree one "
        "turn per round, the order alternating (old new, new old, …) so noise shared by a round falls on both. A "
        f"turn: `bench grpc`'s REST binary and gRPC steps ({c['grpc_step_s']:g} s each, batch 1), then `bench "
        f"overload`'s overload part (capacity {c['capacity_s']:g} s, {c['unloaded_requests']} unloaded requests, "
        f"{c['clients']} clients for {c['flood_s']:g} s with 1 in 16 sending {c['big_rows']}-row JSON bodies and "
        "1 in 16 malformed ones, unloaded requests again) — shorter steps than those benchmarks' own. Re-run: "
        "`git worktree add OLD_TREE OLD_COMMIT`, convert the model with the older tree (`normfuse convert` run "
        "from OLD_TREE, so both can read its manifest), then `normfuse bench before-after --old OLD_TREE --repo "
        "DIR`; `--report-only` re-renders this section from benchmarks/results/before_after.json.")


def _machine(result: dict) -> str:
    m, u = result["machine"], result.get("cpu", {})
    load = " ".join(f"{x:.2f}" for x in result["load_at_start"])
    end = " ".join(f"{x:.2f}" for x in result["load_at_end"])
    return (f"Machine: {u.get('model name', m.get('cpu'))} (cpu family {u.get('cpu family', '?')}, model "
            f"{u.get('model', '?')}), {m.get('logical cores')} logical cores; vector flags "
            f"{' '.join(u.get('flags', [])) or '?'}; load average {load} at start, {end} at end. **The machine "
            "was shared with other jobs**: the ratios, paired within rounds, are what to read, not absolute figures.")


def section(result: dict) -> str:
    c, d = result["config"], result["decode"]
    serving = sum(1 for _, scenario, _, _ in METRICS if scenario != "JSON decode")
    return "\n\n".join([
        TITLE,
        _how(result),
        _machine(result),
        "New ÷ old of the medians over the rounds, with a paired bootstrap 95% interval (`oip.stats.ratio_ci`, "
        f"rounds resampled jointly); *within noise* = the interval contains 1. With {serving} serving measures "
        f"each at 95%, a run where nothing changed flags some measure by chance with probability up to "
        f"{1 - 0.95 ** serving:.0%} (1 − 0.95^{serving}): a flag that a second run does not repeat is noise, not a "
        "regression.",
        ratio_table(result),
        f"JSON decode: `oip.codec.decode_request` of one {d['rows']}-row JSON body ({d['bytes'] / 2**20:.1f} MiB, "
        f"the flood's large body), each tree's codec in its own child process, median of {c['decode_repeats']} "
        "decodes per round (its row above).",
        "Answers during the floods, every round summed (503 = shed by design):",
        codes_table(result),
        "Target (issue 24: the serving benchmarks within noise of the old code, paired ratio interval containing "
        "1): " + target_verdict(result),
    ])


def write(out: Path, result: dict) -> Path:
    """Replace the section in `out` (or add it), keeping everything else."""
    return splice(out, BEGIN, END, f"{BEGIN}\n{section(result)}\n{END}")
