"""The "Hostile and careless clients" section of BENCHMARKS.md, rendered from `normfuse bench hostile`'s JSON
(benchmarks/results/hostile.json) between its own markers, so it re-renders without re-running and merges apart
from the other sections. A scenario left out of a run is said to be, not guessed."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import splice, table

BEGIN, END = "<!-- hostile:begin -->", "<!-- hostile:end -->"


def section(result: dict) -> str:
    m = result["machine"]
    parts = [
        "## Hostile and careless clients",
        "Issue 22's scenarios, each against a real `normfuse serve` process on loopback and run by the tests' own "
        "helpers (`normfuse bench hostile`; `tests/e2e/test_slow_uploads.py`, `test_large_answer.py`, "
        f"`test_fuzz.py`). Machine: {m['cpu']} ({m['cpu family/model']}), {m['logical cores']} logical cores, "
        f"{m.get('memory', '?')}, flags {m['cpu flags']}; **shared with other jobs while this ran** (load average "
        f"{m.get('load average (1/5/15 min) at start', '?')} at start, "
        f"{m.get('load average (1/5/15 min) at end', '?')} at end): times are what a loaded box gives."
        + (" **A --quick smoke run: tiny counts, not numbers.**" if result.get("quick") else ""),
        _slow_uploads(result.get("slow-uploads")),
        _large_answer(result.get("large-answer")),
        _fuzz(result.get("fuzz")),
    ]
    met = targets(result)
    if met:
        parts.append("Targets of this run (issue 22): " + "; ".join(
            f"{name}: **{'met' if ok else 'NOT met'}**" for name, ok in met.items()) + ".")
    return "\n\n".join(parts)


def _slow_uploads(s: dict | None) -> str:
    if s is None:
        return "### Slow uploads held\n\nNot measured in this run."
    rows = []
    for r in s["runs"].values():
        settings = ", ".join(f"`{k}` {v}" for k, v in r["settings"].items()) or "the defaults"
        sent, ok = sum(r["normal"].values()), r["normal"].get("200", 0)
        rows.append([settings, f"{ok} / {sent} ({ok / sent:.0%})", _listed(r["normal"]),
                     "<br>".join(f"{n} × {what}" for what, n in r["tricklers"].items()),
                     f"{r['seconds']:.1f} s", _lost(r["ready_after"], r["tracebacks"])])
    return "### Slow uploads held\n\n" + (
        f"{_tricklers(s)} connections each announce `Content-Length: 1000000` and send one byte every 2 s; once "
        "all are connected, normal requests are sent one after another. The issue measured 0 of 158,042 answered "
        "200 before (every in-flight place held by a trickler).\n\n"
        + table(["settings", "normal requests answered 200", "their statuses", "what the tricklers got",
                 "tricklers + normal requests took", "the server afterwards"], rows))


def _tricklers(s: dict) -> int:
    return max(sum(r["tricklers"].values()) for r in s["runs"].values())


def _large_answer(a: dict | None) -> str:
    if a is None:
        return "### The largest answer refused\n\nNot measured in this run."
    growth = (a["rss_after"] - a["rss_before"]) / 2**20
    return "### The largest answer refused\n\n" + (
        f"A random-weight GPT-2 (2 layers, vocab 50257) converted by `normfuse convert` "
        f"({a['convert_s']:.0f} s), asked for `logits` {a['shape']} of {a['shape'][1]} tokens in the default JSON "
        f"encoding (about {a['json_bytes_about'] / 1e6:.0f} MB of JSON text; {a['binary_bytes'] / 1e6:.0f} MB as "
        "binary). Before the limits the issue measured 200 after 27.6 s with the server's RSS growing 4.6 GB.\n\n"
        + table(["answer", "time to it", "server RSS before → after", "growth", "the server afterwards"],
                [[f"{a['status']}", f"{a['seconds']:.3f} s",
                  f"{a['rss_before'] / 2**20:.0f} → {a['rss_after'] / 2**20:.0f} MiB", f"{growth:+.1f} MiB",
                  _lost(a["ready_after"], a["tracebacks"])]])
        + f"\n\nThe message: `{a['error'][:400]}`")


def _fuzz(f: dict | None) -> str:
    if f is None:
        return "### Bad inputs tried\n\nNot measured in this run."
    sent = f["sent"]["rest"] + f["sent"]["grpc"]
    errors = len(f["server_errors"])
    by = {p: sum(1 for e in f["server_errors"] if e[0].startswith(p)) for p in ("REST", "gRPC")}
    rows = [["REST (JSON, binary, nested, raw bytes, control routes, GETs)", str(f["sent"]["rest"]),
             _listed(f["rest"]), str(by["REST"])],
            ["gRPC (mutated ModelInfer, other methods, bytes that are no message)", str(f["sent"]["grpc"]),
             _listed(f["grpc"]), str(by["gRPC"])]]
    kinds = "".join(f"\n- {' / '.join(map(str, e))[:200]}" for e in f["server_errors"][:10])
    return "### Bad inputs tried\n\n" + (
        f"{sent} malformed, protocol-shaped requests from hypothesis (derandomized: the same ones every time the "
        f"benchmark runs), one at a time, to one server, in {f['seconds']:.0f} s (CPU: {f['cpu']['client_s']:.0f} s generating and "
        f"sending, {f['cpu']['server_s']:.0f} s in the server). `closed`: the server answered (e.g. 404) before "
        "the upload ended and closed the connection. A 504 is the request's own `timeout` parameter passing in "
        "the queue (the answer it asked for), the one 5xx not counted as a server error.\n\n"
        + table(["protocol", "requests", "statuses seen", "server errors (5xx; INTERNAL, UNKNOWN, UNAVAILABLE)"], rows)
        + f"\n\nServer errors: **{errors}**{kinds}. Afterwards a normal request got {f['normal_after']}; "
        f"tracebacks in the server's log: {f['tracebacks']}.")


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} × {n}" for status, n in counts.items())


def _lost(ready: bool, tracebacks: int) -> str:
    problems = [p for p in ("NOT ready" if not ready else "", f"{tracebacks} tracebacks in its log" if tracebacks
                            else "") if p]
    return ", ".join(problems) if problems else "ready, no traceback in its log"


def targets(result: dict) -> dict[str, bool]:
    """Issue 22's targets, for the scenarios this run measured."""
    met = {}
    held = (result.get("slow-uploads") or {"runs": {}})["runs"].get("held")
    if held:
        met[f"≥ 90% of normal requests answered 200 during {sum(held['tricklers'].values())} trickling "
            "uploads"] = held["normal"].get("200", 0) >= 0.9 * sum(held["normal"].values())
    big = result.get("large-answer")
    if big:
        met[f"the {big['shape'][1]}-token JSON answer refused in < 1 s"] = big["status"] == 413 and big["seconds"] < 1
        met["with the server's RSS growing < 100 MiB"] = big["rss_after"] - big["rss_before"] < 100 * 2**20
    f = result.get("fuzz")
    if f:
        sent = f["sent"]["rest"] + f["sent"]["grpc"]
        met[f"zero 5xx over ≥ 10,000 fuzzed requests ({sent} sent)"] = sent >= 10_000 and not f["server_errors"]
    return met


def write(out: Path, result: dict) -> Path:
    """Replace the section in `out` (or add it), keeping everything else."""
    return splice(out, BEGIN, END, f"{BEGIN}\n{section(result)}\n{END}")
