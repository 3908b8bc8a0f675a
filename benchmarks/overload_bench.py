"""`normfuse bench overload`: the server as `normfuse serve` runs it by default, measured the way users meet it.

Two parts, one server process each, traffic to 127.0.0.1 only, every step bounded in requests and seconds:

1. **Defaults.** Triton's own HTTP client (tritonclient, binary tensors), one request at a time, against the
   engine alone in this process: served p50 - engine p50 is the server's overhead. Then saturated throughput
   at concurrency 32 with the default settings and with the former 2 ms batching window, interleaved
   (A B A B) on the same server kind.
2. **Overload.** Capacity (closed loop at 32) and the unloaded p50 just before; then `clients` concurrent
   clients for `flood_s` seconds, 1 in 16 sending `big_rows`-row JSON bodies and 1 in 16 malformed ones, the
   rest batch-1 binary requests: counts by status, connection errors, items answered per second (goodput),
   admitted-request p99, the server's peak RSS growth; then the unloaded p50 again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from benchmarks import loadgen
from benchmarks.engines_bench import input_specs
from benchmarks.inputs import random_inputs
from benchmarks.peers import launch
from oip import codec
from oip.stats import ratio_ci, summarize


@dataclass(frozen=True)
class OverloadConfig:
    model: str = "vit-digits"
    clients: int = 256                # concurrent clients in the flood (about 10x what saturates one replica)
    flood_s: float = 20.0
    big_rows: int = 4096              # rows of the 1-in-16 large bodies
    every: int = 16                   # 1 in `every` clients sends large bodies, another 1 in `every` malformed
    capacity_s: float = 8.0           # closed loop at 32 just before the flood
    unloaded_requests: int = 300      # concurrency-1 requests before and after
    triton_requests: int = 500        # tritonclient, concurrency 1
    window_rounds: int = 6            # default vs 2 ms window, alternating (A B, A B, ...)
    window_s: float = 3.0
    engine_rounds: int = 300
    log_dir: Path = field(default=Path(".bench/logs"))


def run(repo: Path, config: OverloadConfig) -> dict:
    import engines

    manifest = engines.read_manifest(Path(repo) / config.model)
    specs = input_specs(manifest, 1)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "engine": engine_p50(repo, config, specs)}
    result["defaults"] = defaults(repo, config, specs)
    with launch.start("normfuse", log_dir=config.log_dir, repo=str(repo), max_batch_size=None,
                      max_queue_delay_ms=None) as server:
        result["overload"] = overload(server, config, specs)
    return result


def engine_p50(repo: Path, config: OverloadConfig, specs: list[dict]) -> dict:
    """The default variant's engine alone, batch 1, in this process (serving_bench's raw-engine measure)."""
    import engines
    from benchmarks.serving_bench import ServingBenchConfig, raw_engine

    variant = engines.read_manifest(Path(repo) / config.model).default_variant
    row = raw_engine(Path(repo), ServingBenchConfig(model=config.model, variant=variant, batch_sizes=(1,),
                                                    engine_rounds=config.engine_rounds), specs)[0]
    return {"variant": variant, "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"]}


def triton_client_p50(base: str, config: OverloadConfig, specs: list[dict]) -> dict:
    """Triton's HTTP client, binary inputs and outputs, one request at a time."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    x = random_inputs(specs, 1)
    inputs = []
    for spec in specs:
        item = httpclient.InferInput(spec["name"], list(x[spec["name"]].shape), spec["datatype"])
        item.set_data_from_numpy(x[spec["name"]], binary_data=True)
        inputs.append(item)
    client.infer(config.model, inputs)
    samples = []
    for _ in range(config.triton_requests):
        start = time.perf_counter()
        client.infer(config.model, inputs)
        samples.append(time.perf_counter() - start)
    client.close()
    return summarize(samples).as_ms()


def defaults(repo: Path, config: OverloadConfig, specs: list[dict]) -> dict:
    """c=1 overhead with tritonclient at the defaults; c=32 throughput, defaults vs the former 2 ms window: both
    servers up at once (the idle one costs nothing), measured in alternation A B, A B, … so that the machine's
    changing load falls on both alike."""
    out: dict = {"throughput_c32": {"default": [], "window_2ms": []}}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(launch.start("normfuse", log_dir=config.log_dir, repo=str(repo),
                                                          max_batch_size=None, max_queue_delay_ms=window))
                   for name, window in (("default", None), ("window_2ms", 2.0))}
        out["triton_c1"] = triton_client_p50(servers["default"].base_url, config, specs)
        for _ in range(config.window_rounds):
            for name, server in servers.items():
                target = loadgen.make_target(server.base_url, config.model, specs, binary=True)
                r = asyncio.run(loadgen.closed_loop(target, 32, max_requests=100_000, max_seconds=config.window_s))
                out["throughput_c32"][name].append(r.throughput)
    return out


def unloaded_p50(base: str, config: OverloadConfig, specs: list[dict]) -> float:
    target = loadgen.make_target(base, config.model, specs, binary=True)
    r = asyncio.run(loadgen.closed_loop(target, 1, max_requests=config.unloaded_requests, max_seconds=30))
    return summarize([s.latency for s in r.ok]).median * 1e3


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bodies(base: str, config: OverloadConfig, specs: list[dict]) -> dict[str, tuple[bytes, dict, int]]:
    """(body, headers, rows) per client kind: batch-1 binary, `big_rows` JSON, and a cut-off JSON body."""
    small, small_h = codec.encode_request(random_inputs(specs, 1), binary=True)
    big, big_h = codec.encode_request(random_inputs(specs, config.big_rows, seed=1), binary=False)
    bad, bad_h = codec.encode_request(random_inputs(specs, 1, seed=2), binary=False)
    return {"small": (small, small_h, 1), "big": (big, big_h, config.big_rows),
            "malformed": (bad[: len(bad) // 2], bad_h, 0)}


def overload(server, config: OverloadConfig, specs: list[dict]) -> dict:
    base = server.base_url
    target = loadgen.make_target(base, config.model, specs, binary=True)
    capacity = asyncio.run(loadgen.closed_loop(target, 32, max_requests=100_000, max_seconds=config.capacity_s))
    before = unloaded_p50(base, config, specs)
    rss_before = rss_bytes(server.process.pid)
    flood = asyncio.run(_flood(base, config, bodies(base, config, specs), server.process.pid))
    after = unloaded_p50(base, config, specs)
    return {"capacity_items_per_s": capacity.throughput, "unloaded_p50_ms_before": before,
            "unloaded_p50_ms_after": after, "rss_before_mib": rss_before / 2**20,
            "rss_growth_mib": (flood.pop("rss_peak") - rss_before) / 2**20, **flood}


async def _flood(base: str, config: OverloadConfig, kinds: dict, pid: int) -> dict:
    url = loadgen.infer_url(base, config.model)
    codes: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    admitted: list[float] = []
    items = 0
    peak = rss_bytes(pid)
    deadline = time.perf_counter() + config.flood_s

    async def client(kind: str, session: aiohttp.ClientSession) -> None:
        nonlocal items
        body, headers, rows = kinds[kind]
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__  # a dropped connection or a timeout
            codes[kind][status] = codes[kind].get(status, 0) + 1
            if status == "200":
                admitted.append(time.perf_counter() - start)
                items += rows

    async def sample_rss() -> None:
        nonlocal peak
        while time.perf_counter() < deadline + 1:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.1)

    plan = ["big" if i % config.every == 0 else "malformed" if i % config.every == 1 else "small"
            for i in range(config.clients)]
    connector = aiohttp.TCPConnector(limit=config.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter()
        await asyncio.gather(sample_rss(), *(client(kind, session) for kind in plan))
        elapsed = time.perf_counter() - start
    latency = summarize(admitted)
    return {"codes": codes, "elapsed_s": elapsed, "goodput_items_per_s": items / elapsed,
            "admitted_p50_ms": latency.median * 1e3, "admitted_p99_ms": latency.p99 * 1e3,
            "rss_peak": peak, "clients": {k: plan.count(k) for k in kinds},
            "all_codes": _totals(codes)}


def _totals(codes: dict[str, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for per_kind in codes.values():
        for status, n in per_kind.items():
            total[status] = total.get(status, 0) + n
    return dict(sorted(total.items()))


def window_ratio(result: dict):
    """Throughput default ÷ 2 ms window at concurrency 32: ratio of medians, paired bootstrap over the rounds."""
    t = result["defaults"]["throughput_c32"]
    return ratio_ci(t["window_2ms"], t["default"])


def targets(result: dict) -> dict[str, bool]:
    """The issue's targets, checked on one result."""
    o, d, e = result["overload"], result["defaults"], result["engine"]
    statuses = set(o["all_codes"])
    return {
        "served p50 <= engine p50 + 1 ms (tritonclient, c=1)": d["triton_c1"]["p50_ms"] <= e["p50_ms"] + 1.0,
        # paired over the alternating rounds: met unless the default is measurably slower (interval below 1)
        "c=32 throughput, default >= 2 ms window (paired 95% interval of the ratio reaches 1)":
            window_ratio(result).high >= 1.0,
        "overload: only 200 / 4xx / 503, no dropped connection": all(s == "200" or s == "503" or s.startswith("4")
                                                                      for s in statuses),
        "overload: RSS growth <= 600 MiB": o["rss_growth_mib"] <= 600,
        "overload: unloaded p50 after <= 2x before": o["unloaded_p50_ms_after"] <= 2 * o["unloaded_p50_ms_before"],
        "overload: goodput >= 50% of capacity": o["goodput_items_per_s"] >= 0.5 * o["capacity_items_per_s"],
    }
