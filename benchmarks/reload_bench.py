"""`normfuse bench reload`: what a zero-downtime swap of a re-converted model costs the requests around it.

One `normfuse serve` with its default settings plus `--model-control-mode poll` (`NORMFUSE_REPOSITORY_POLL_SECS`
= `poll_s`) serves a copy of MODEL; a closed loop of `concurrency` workers (loadgen) runs for the whole
measurement; every `gap_s` the model is re-converted the way `normfuse convert` lands a conversion (a complete
copy staged beside it with a new manifest, then moved into place by convert.staging.move_into_place; a swap's
clock starts at that move). The conversion itself is not re-run: its CPU would be measured too. A monitor polls the model config's revision and
`normfuse_model_revisions` every 50 ms, which marks each swap: from the rename until the new revision serves
("load": the old revision serves meanwhile), then until the old one has closed ("drain").

Reported: every request's status (a failed request is a non-200), and latency of the requests started during
swaps vs the others, with a timeline plot (p50/p99 per 250 ms bin, swaps shaded).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks import loadgen
from benchmarks.peers import launch
from oip.stats import summarize

RELOAD_BEGIN, RELOAD_END = "<!-- reload:begin -->", "<!-- reload:end -->"
BIN_S = 0.25


@dataclass(frozen=True)
class ReloadConfig:
    model: str = "vit-digits"
    swaps: int = 5
    gap_s: float = 6.0          # between re-conversions (the first after one gap of steady load)
    poll_s: float = 1.0         # NORMFUSE_REPOSITORY_POLL_SECS
    concurrency: int = 4
    batch: int = 1
    log_dir: Path = Path(".bench/logs")


def stage(repo: Path, model: str) -> Path:
    """A new revision of `model`, as convert stages one: its files copied into a hidden directory beside it, with a
    new manifest (new created_at, so a new sha256). convert.staging.move_into_place lands it."""
    from engines.manifest import read_manifest, write_manifest

    staging = Path(tempfile.mkdtemp(prefix=f".{model}.partial-", dir=repo))
    shutil.copytree(repo / model, staging, dirs_exist_ok=True)
    manifest = read_manifest(staging)
    write_manifest(staging, manifest.model_copy(update={"created_at": datetime.now(timezone.utc)}))
    return staging


async def _state(session: aiohttp.ClientSession, base: str, model: str) -> tuple[str, float]:
    async with session.get(f"{base}/v2/models/{model}/config") as r:
        revision = (await r.json())["parameters"]["revision"]["string_value"]
    async with session.get(f"{base}/metrics") as r:
        text = await r.text()
    held = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f'normfuse_model_revisions{{model="{model}"}}'))
    return revision, held


async def _swaps(base: str, repo: Path, config: ReloadConfig, t0: float) -> list[dict]:
    """Re-convert every gap_s; for each, when the new revision served and the old one had closed (s from t0)."""
    from convert.staging import move_into_place
    swaps = []
    async with aiohttp.ClientSession() as session:
        revision, _ = await _state(session, base, config.model)
        for _ in range(config.swaps):
            await asyncio.sleep(config.gap_s)
            staging = await asyncio.to_thread(stage, repo, config.model)  # the copy is not part of the swap
            renamed = time.perf_counter()
            move_into_place(staging, repo / config.model)
            serving = closed = None
            while closed is None and time.perf_counter() - renamed < 60:
                now_revision, held = await _state(session, base, config.model)
                if serving is None and now_revision != revision:
                    serving, revision = time.perf_counter(), now_revision
                if serving is not None and held == 1:
                    closed = time.perf_counter()
                await asyncio.sleep(0.05)
            swaps.append({"renamed": renamed - t0, "serving": serving and serving - t0,
                          "closed": closed and closed - t0, "revision": revision})
        await asyncio.sleep(config.gap_s / 2)
    return swaps


async def _measure(base: str, repo: Path, config: ReloadConfig, specs: list[dict]) -> tuple[list, list[dict], float]:
    """The load for gap_s × (swaps + 1) + 10 s (the swaps end before that), and the swaps within it."""
    target = loadgen.make_target(base, config.model, specs, batch=config.batch, binary=True, label="reload")
    t0 = time.perf_counter()
    result, swaps = await asyncio.gather(
        loadgen.closed_loop(target, config.concurrency, max_requests=10**6,
                            max_seconds=config.gap_s * (config.swaps + 1) + 10, warmup=0),
        _swaps(base, repo, config, t0))
    return result.samples, swaps, t0


def run(repo: Path, config: ReloadConfig) -> dict:
    import convert.pipeline  # noqa: F401 - torch's import would otherwise stall the load generator's loop
    from service.settings import Settings

    started, load_start, clock = datetime.now(timezone.utc), os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normfuse-reload-") as work:
        shutil.copytree(Path(repo) / config.model, Path(work) / config.model)
        defaults = Settings.model_fields
        env = {"NORMFUSE_MODEL_CONTROL_MODE": "poll", "NORMFUSE_REPOSITORY_POLL_SECS": str(config.poll_s),
               "NORMFUSE_LOG_LEVEL": "warning"}
        with launch.start("normfuse", log_dir=config.log_dir, repo=work, model=config.model, env=env,
                          max_batch_size=defaults["max_batch_size"].default,
                          max_queue_delay_ms=defaults["max_queue_delay_ms"].default) as server:
            specs = asyncio.run(loadgen.fetch_metadata(server.base_url, config.model))["inputs"]
            samples, swaps, t0 = asyncio.run(_measure(server.base_url, Path(work), config, specs))
    result = analyse(samples, swaps, t0)
    from benchmarks.report import machine

    return {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - clock,
            "machine": machine(load_start), "config": {**asdict(config), "log_dir": str(config.log_dir)},
            "settings": {"max_batch_size": defaults["max_batch_size"].default,
                         "max_queue_delay_ms": defaults["max_queue_delay_ms"].default}, **result}


def analyse(samples: list, swaps: list[dict], t0: float) -> dict:
    """Requests by status; latency of those started during a swap (rename -> old revision closed) vs the rest;
    a timeline of p50/p99 per BIN_S."""
    windows = [(s["renamed"], s["closed"] or s["serving"] or s["renamed"]) for s in swaps]
    rows = [(s.scheduled - t0, s.latency, s.status) for s in samples]
    during = [lat for t, lat, status in rows if status == "200" and any(a <= t <= b for a, b in windows)]
    steady = [lat for t, lat, status in rows if status == "200" and not any(a <= t <= b for a, b in windows)]
    codes: dict[str, int] = {}
    for _, _, status in rows:
        codes[status] = codes.get(status, 0) + 1
    timeline = []
    if rows:
        starts = np.array([t for t, _, _ in rows])
        latencies = np.array([lat for _, lat, _ in rows])
        for edge in np.arange(0.0, starts.max() + BIN_S, BIN_S):
            chosen = latencies[(starts >= edge) & (starts < edge + BIN_S)]
            if chosen.size:
                p50, p99 = np.percentile(chosen, [50, 99]) * 1e3
                timeline.append([round(float(edge), 3), int(chosen.size), round(float(p50), 3), round(float(p99), 3)])
    load = [s["serving"] - s["renamed"] for s in swaps if s["serving"] is not None]
    drain = [s["closed"] - s["serving"] for s in swaps if s["closed"] is not None and s["serving"] is not None]
    return {"swaps": swaps, "sent": len(rows), "failed": len(rows) - codes.get("200", 0), "codes": codes,
            "steady": summarize(steady).as_ms(), "swapping": summarize(during).as_ms(),
            "load_s": summarize(load).as_ms(), "drain_s": summarize(drain).as_ms(), "timeline": timeline}


def section(result: dict, plot: Path | None = None, out_dir: Path | None = None) -> str:
    """BENCHMARKS.md's reload section from `normfuse bench reload`'s results (it names its own run)."""
    from benchmarks.report import table

    c, m = result["config"], result["machine"]
    load = m.get("load average (1/5/15 min) at start", "?")
    end = m.get("load average (1/5/15 min) at end", "?")
    swapped = sum(s["serving"] is not None for s in result["swaps"])
    parts = [f"Measured by `normfuse bench reload` at {result['started']} ({result['wall_s']:.0f} s; load average "
             f"{load} at start, {end} at end; {m.get('logical cores')} logical cores, shared with other work). "
             f"Model `{c['model']}`, one `normfuse serve` with its default settings (max batch "
             f"{result['settings']['max_batch_size']}, queue delay {result['settings']['max_queue_delay_ms']} ms) plus "
             f"`--model-control-mode poll --repository-poll-secs {c['poll_s']:g}`; a closed loop of "
             f"{c['concurrency']} workers (batch {c['batch']}, binary) ran throughout, and the model was re-converted "
             f"{c['swaps']} times, {c['gap_s']:g} s apart (files copied, a new manifest, moved into place as convert "
             "does). A request counts as *during a swap* if it started between the rename and the old revision's "
             "close. How the swap works: docs/serving.md, *Model control*."]
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(result["codes"].items()))
    parts.append(f"**{result['sent']} requests, {result['failed']} failed** (statuses {statuses}); "
                 f"{swapped}/{c['swaps']} re-conversions swapped in. Requests during a swap are slower because "
                 "loading and warming up the new revision's engines takes the cores that serve.")
    rows = []
    for name, key in (("steady", "steady"), ("during a swap", "swapping")):
        row = result[key]
        rows.append([name, row["n"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}", f"{row['p99_ms']:.2f}"])
    parts.append(table(["requests", "n", "p50 ms", "p90 ms", "p99 ms"], rows))
    load_s, drain_s = result["load_s"], result["drain_s"]
    parts.append(f"Swap timing, median over the swaps: rename → new revision serving {load_s['p50_ms'] / 1e3:.2f} s "
                 f"(the poll interval, then load + sha256 check + warm-up, the old revision serving meanwhile); "
                 f"new revision serving → old revision closed {drain_s['p50_ms'] / 1e3:.2f} s (as seen by a monitor "
                 "polling every 50 ms: 0 means within the same poll).")
    if plot is not None:
        rel = os.path.relpath(plot, out_dir) if out_dir else str(plot)
        parts.append(f"![request latency over time, swaps shaded]({rel})")
    return "\n\n".join(parts)


def write(out: Path, result: dict, *, plot_dir: Path) -> Path:
    """Render the reload section (and its plot) into `out`, replacing a previous one; the rest is kept."""
    from benchmarks.report import splice

    figure = plot(result, Path(plot_dir) / "reload.png")
    block = (f"{RELOAD_BEGIN}\n## Model reload: a re-conversion swapped in under load\n\n"
             f"{section(result, figure, Path(out).parent)}\n{RELOAD_END}")
    return splice(out, RELOAD_BEGIN, RELOAD_END, block)


def plot(result: dict, path: Path) -> Path | None:
    from benchmarks.plots import _save, plt

    if not result["timeline"]:
        return None
    t, _, p50, p99 = (list(col) for col in zip(*result["timeline"], strict=True))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(t, p50, label="p50", lw=1)
    ax.plot(t, p99, label="p99", lw=1)
    for i, s in enumerate(result["swaps"]):
        end = s["closed"] or s["serving"] or s["renamed"]
        ax.axvspan(s["renamed"], end, color="tab:orange", alpha=0.25, label="swap (rename → old closed)" if i == 0 else None)
        if s["serving"] is not None:
            ax.axvline(s["serving"], color="tab:red", lw=0.8, ls="--", label="new revision serving" if i == 0 else None)
    ax.set_xlabel(f"time (s), {BIN_S:g} s bins")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("normfuse: latency while re-conversions are swapped in (poll mode)")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)
