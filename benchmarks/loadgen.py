"""An HTTP load generator for OIP v2 infer endpoints: closed-loop concurrency and open-loop Poisson arrivals.

Closed loop: `concurrency` workers each send the next request as soon as the last one returns (what
perf_analyzer's concurrency mode and most vendor numbers do). Open loop: arrival times are drawn from a
Poisson process *before* the run starts and each request is sent at its scheduled time whether or not
earlier ones have returned; its latency is measured from the scheduled time, so a server that stalls
is charged for the whole stall (no coordinated omission). Both are bounded by a request count and a
wall-clock limit; requests still outstanding at the limit are cancelled and counted as `timeout`.
Requests go through aiohttp (the fastest asyncio HTTP client installed); httpx serves the control calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np

from benchmarks.inputs import random_inputs
from oip import codec
from oip.stats import summarize


@dataclass(frozen=True)
class Target:
    """Where to send requests and what to send: one pre-encoded body reused for every request."""

    url: str                      # the full infer URL
    body: bytes
    headers: dict[str, str]
    batch: int = 1                # items per request, for items/s
    label: str = ""               # e.g. "normfuse/json/unfused"


def infer_url(base: str, model: str, version: str | None = None) -> str:
    base = base.rstrip("/")
    return f"{base}/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def make_target(base: str, model: str, specs: list[dict], *, version: str | None = None, binary: bool = False,
                batch: int = 1, label: str = "", seed: int = 0) -> Target:
    body, headers = codec.encode_request(random_inputs(specs, batch, seed=seed), binary=binary)
    return Target(infer_url(base, model, version), body, headers, batch, label)


@dataclass
class Sample:
    scheduled: float   # when the request was due (closed loop: when it was sent)
    end: float
    status: str        # "200", "503", … or "timeout", "connect-error", "error"

    @property
    def latency(self) -> float:
        return self.end - self.scheduled


@dataclass
class LoadResult:
    label: str
    mode: str                      # "closed" or "open"
    level: float                   # concurrency, or offered rate (req/s)
    batch: int
    duration_s: float
    samples: list[Sample] = field(repr=False, default_factory=list)
    send_lags: list[float] = field(repr=False, default_factory=list)  # open loop: send start - scheduled time, s

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == "200"]

    @property
    def throughput(self) -> float:
        """Successful requests per second over the run."""
        return len(self.ok) / self.duration_s if self.duration_s > 0 else 0.0

    def codes(self) -> dict[str, int]:
        return dict(Counter(s.status for s in self.samples))

    def to_dict(self) -> dict:
        latency = summarize([s.latency for s in self.ok])
        return {
            "label": self.label, "mode": self.mode, "level": self.level, "batch": self.batch,
            "sent": len(self.samples), "ok": len(self.ok), "codes": self.codes(),
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": self.throughput, "items_per_s": self.throughput * self.batch,
            **{k: v for k, v in latency.as_ms().items() if k != "n"},
        }


async def _send(session: aiohttp.ClientSession, target: Target, scheduled: float) -> Sample:
    try:
        async with session.post(target.url, data=target.body, headers=target.headers) as response:
            await response.read()
            status = str(response.status)
    except asyncio.TimeoutError:
        status = "timeout"
    except aiohttp.ClientConnectorError:
        status = "connect-error"
    except aiohttp.ClientError:
        status = "error"
    return Sample(scheduled, time.perf_counter(), status)


def _client(connections: int, timeout: float) -> aiohttp.ClientSession:
    # aiohttp, not httpx, for the hot path: on this machine httpx's pool capped a trivial endpoint at
    # ~170 req/s with 32 connections where aiohttp reached ~1,300 — the client would have been measured
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))


async def closed_loop(target: Target, concurrency: int, *, max_requests: int, max_seconds: float,
                      timeout: float = 30.0, warmup: int = 1) -> LoadResult:
    """`concurrency` workers send back to back until `max_requests` are sent or `max_seconds` pass.

    Requests in flight at the deadline are allowed to finish (each is bounded by `timeout`)."""
    if concurrency < 1 or max_requests < 1 or max_seconds <= 0:
        raise ValueError("concurrency and max_requests must be >= 1 and max_seconds > 0")
    samples: list[Sample] = []
    async with _client(concurrency, timeout) as client:
        await asyncio.gather(*(_send(client, target, time.perf_counter()) for _ in range(warmup * concurrency)))
        start = time.perf_counter()
        deadline = start + max_seconds
        budget = iter(range(max_requests))

        async def worker() -> None:
            # no new request after the deadline; one in flight finishes (bounded by the client timeout)
            while next(budget, None) is not None and time.perf_counter() < deadline:
                samples.append(await _send(client, target, time.perf_counter()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return LoadResult(target.label, "closed", concurrency, target.batch, duration, samples)


def poisson_schedule(rate: float, max_requests: int, max_seconds: float, seed: int = 0) -> np.ndarray:
    """Send offsets (seconds from the start) of a Poisson process at `rate`/s, cut at both bounds."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, max_requests))
    return offsets[offsets < max_seconds]


async def open_loop(target: Target | Sequence[Target], rate: float, *, max_requests: int, max_seconds: float,
                    timeout: float = 30.0, seed: int = 0, connections: int = 256) -> LoadResult:
    """Poisson arrivals at `rate`/s, scheduled in advance; latency counts from each scheduled time.

    With several targets (replicas), each request goes to one drawn at random, as kube-proxy's iptables mode
    spreads a Service's traffic. Requests still outstanding `timeout` seconds after the last scheduled send are
    cancelled and recorded as "timeout" at the moment of cancellation. `send_lags` records how late the client
    itself started each send: included in the latency by design (no coordinated omission), but not the server's.
    """
    targets = [target] if isinstance(target, Target) else list(target)
    offsets = poisson_schedule(rate, max_requests, max_seconds, seed)
    choice = np.random.default_rng(seed + 1).integers(0, len(targets), offsets.size)
    tasks: list[asyncio.Task] = []
    lags: list[float] = []
    async with _client(connections, timeout) as client:
        for each in targets:  # one open connection each before the clock starts
            await _send(client, each, time.perf_counter())
        start = time.perf_counter()
        for offset, which in zip(offsets, choice, strict=True):
            due = start + float(offset)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(time.perf_counter() - due)
            tasks.append(asyncio.create_task(_send(client, targets[which], due)))
        done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        now = time.perf_counter()
        samples = [t.result() for t in tasks if t in done]
        samples += [Sample(start + float(o), now, "timeout") for t, o in zip(tasks, offsets, strict=True) if t in pending]
        end = max((s.end for s in samples), default=start)
    return LoadResult(targets[0].label, "open", rate, targets[0].batch, end - start, samples, lags)


async def fetch_metadata(base: str, model: str, timeout: float = 10.0) -> dict:
    """GET /v2/models/{model}: inputs, outputs and (for normfuse) the variants as `versions`."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(f"{base.rstrip('/')}/v2/models/{model}")
        response.raise_for_status()
        return response.json()


async def wait_ready(base: str, timeout: float = 60.0, path: str = "/v2/health/ready") -> None:
    """Poll the readiness endpoint until it answers 200, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            try:
                if (await client.get(base.rstrip("/") + path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base}{path} not ready after {timeout:.0f} s")
            await asyncio.sleep(0.2)
