"""How many replicas a request rate and a p99 SLO need: a queueing model fitted to one replica's measured curve.

Assumptions (docs/scaling.md discusses each):

* Arrivals are Poisson at `rate` req/s. A load balancer that picks a replica at random per request
  (kube-proxy in iptables mode) splits them into n independent Poisson streams of rate/n (Poisson
  thinning); round-robin gives each replica *less* variable arrivals, so the random split is the
  conservative case.
* A replica is one queue with a latency quantile

      T_q(λ) = base + κ · (−ln(1 − q)) / (μ − λ)

  For κ = 1 and base = 0 this is the M/M/1 sojourn-time quantile (the time in system of M/M/1 FCFS is
  exponential with rate μ − λ). `base` is the part no queue explains (HTTP, parsing, the spread of one
  engine run). κ scales the queueing term: by Kingman's heavy-traffic approximation the waiting time
  of G/G/1 is roughly exponential with mean (c_a² + c_s²)/2 · 1/(μ − λ), so with Poisson arrivals
  κ ≈ (1 + c_s²)/2 — 1 for exponential service, ½ for deterministic service. By default κ = 1 and
  (μ, base) are fitted to the replica's measured open-loop p99 at several offered rates (relative
  least squares); the closed-loop saturation throughput is measured separately as a check.
* Where it breaks: dynamic batching makes the service rate load-dependent (a replica serves faster
  the more requests it batches), so no single μ is right at every load: the closed-loop μ (largest
  batches, a client that never idles) over-states what Poisson arrivals get, which is why μ is fitted
  to the open-loop curve. Beyond the fitted range the model extrapolates; the utilisation cap keeps
  plans away from saturation, where every queueing model's error explodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace


class InfeasibleSLO(ValueError):
    """No number of replicas can meet the latency objective (it is below one replica's latency at no load)."""


def mm1_sojourn_quantile(rate: float, mu: float, q: float) -> float:
    """q-quantile of the M/M/1 (FCFS) time in system, seconds: −ln(1 − q) / (μ − λ); inf when λ ≥ μ."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if mu <= 0 or rate < 0:
        raise ValueError(f"need mu > 0 and rate >= 0, got mu={mu}, rate={rate}")
    return math.inf if rate >= mu else -math.log1p(-q) / (mu - rate)


def kingman_wait(rate: float, mu: float, ca2: float = 1.0, cs2: float = 1.0) -> float:
    """Kingman's G/G/1 mean waiting time (queue only), seconds: ρ/(1 − ρ) · (c_a² + c_s²)/2 · 1/μ.

    Exact for M/M/1 (c_a² = c_s² = 1) and for M/G/1 (Pollaczek–Khinchine) when c_a² = 1."""
    if mu <= 0 or rate < 0:
        raise ValueError(f"need mu > 0 and rate >= 0, got mu={mu}, rate={rate}")
    if rate >= mu:
        return math.inf
    rho = rate / mu
    return rho / (1 - rho) * (ca2 + cs2) / 2 / mu


def mm1_queue_length(rho: float) -> float:
    """Mean number of requests *waiting* (not in service) in M/M/1: ρ² / (1 − ρ)."""
    if not 0 <= rho < 1:
        return math.inf if rho >= 1 else math.nan
    return rho * rho / (1 - rho)


def mm1_wait_quantile(rate: float, mu: float, q: float) -> float:
    """q-quantile of the M/M/1 waiting time in queue: P(W > t) = ρ·e^{−(μ−λ)t}, so ln(ρ/(1−q))/(μ − λ), 0 when
    fewer than a share 1 − q of requests wait at all."""
    if rate >= mu:
        return math.inf
    rho = rate / mu
    return max(0.0, math.log(rho / (1 - q)) / (mu - rate)) if rho > 0 else 0.0


def utilisation_where(metric, target: float, *, tolerance: float = 1e-9) -> float:
    """The utilisation ρ in (0, 1) at which an increasing `metric(ρ)` reaches `target` (bisection)."""
    low, high = 0.0, 1.0 - 1e-12
    if metric(high) < target:
        return high
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if metric(mid) < target else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class QueueFit:
    """One replica: T_q(λ) = base_s + kappa · (−ln(1 − q)) / (mu − λ)."""

    mu: float                 # service rate, req/s: fitted to the open-loop points (fit_queue), or given
    base_s: float             # latency no queue explains, seconds
    kappa: float = 1.0        # queueing-term scale: 1 = M/M/1, ½ = deterministic service (heavy traffic)
    q: float = 0.99
    rms_rel_error: float = math.nan   # of the fit on the points it was fitted to
    points: int = 0

    def __post_init__(self) -> None:
        if not self.mu > 0 or self.base_s < 0 or self.kappa < 0 or not 0 < self.q < 1:
            raise ValueError(f"need mu > 0, base_s >= 0, kappa >= 0, 0 < q < 1; got {self}")

    @property
    def tail(self) -> float:
        return -math.log1p(-self.q)

    def latency(self, rate: float) -> float:
        """Predicted q-quantile (s) of one replica at `rate` req/s: base + κ × the M/M/1 sojourn quantile;
        inf at or beyond saturation (also for κ = 0)."""
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        return math.inf if rate >= self.mu else self.base_s + self.kappa * mm1_sojourn_quantile(rate, self.mu, self.q)

    @property
    def floor_s(self) -> float:
        """The quantile as the rate goes to 0: no SLO at or below it can be met."""
        return self.latency(0.0)

    def max_rate(self, slo_s: float) -> float:
        """The largest per-replica rate whose predicted quantile is ≤ slo_s (0 when even λ → 0 misses it)."""
        if slo_s <= self.floor_s:
            return 0.0
        return self.mu - self.kappa * self.tail / (slo_s - self.base_s)

    def with_mu(self, mu: float) -> QueueFit:
        return replace(self, mu=mu)

    def to_dict(self) -> dict:
        return {"mu": self.mu, "base_ms": self.base_s * 1e3, "kappa": self.kappa, "q": self.q,
                "cs2": 2 * self.kappa - 1, "rms_rel_error": self.rms_rel_error, "points": self.points}


def fit_queue(points: Iterable[tuple[float, float]], q: float = 0.99, *, mu: float | None = None,
              kappa: float | None = 1.0, mu_hint: float | None = None) -> QueueFit:
    """Fit T_q(λ) = base + κ·(−ln(1−q))/(μ − λ) to measured (rate req/s, q-quantile s) points.

    Relative least squares (each point weighted 1/T², so a 5 ms point counts as much as a 200 ms one),
    base ≥ 0 and κ ≥ 0. `mu` fixed, or None: profiled over (max rate, 20 × max rate]; when the data
    cannot place it (the optimum is the search's upper edge: no queueing visible) `mu_hint` (a measured
    saturation throughput) is used if given. `kappa` fixed (default 1: M/M/1 plus a fixed overhead, two
    parameters) or None: fitted too. Points at or beyond a fixed μ carry no information about a stable
    queue and are dropped.
    """
    kept = [(r, t) for r, t in points if r >= 0 and math.isfinite(t) and t > 0 and (mu is None or r < mu)]
    if not kept:
        raise ValueError("no measured point below the saturation rate to fit")
    if mu is None:
        top = max(r for r, _ in kept)
        low, high = top * 1.0005 + 1e-9, top * 20 + 1.0
        grid = [low * (high / low) ** (i / 400) for i in range(401)]

        def cost(m: float) -> float:
            return _fit_at(kept, q, m, kappa)[2]

        i = min(range(len(grid)), key=lambda j: cost(grid[j]))
        best = _golden_min(cost, grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)])
        mu = mu_hint if (i == len(grid) - 1 and mu_hint) else best
        kept = [(r, t) for r, t in kept if r < mu]
        if not kept:
            raise ValueError(f"every measured point is at or beyond the saturation rate {mu:.1f} req/s")
    base, k, sse = _fit_at(kept, q, mu, kappa)
    return QueueFit(mu=mu, base_s=base, kappa=k, q=q, rms_rel_error=math.sqrt(sse / len(kept)), points=len(kept))


def _golden_min(f, lo: float, hi: float, iterations: int = 60) -> float:
    """Golden-section search for the minimum of f on [lo, hi] (f unimodal there)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iterations):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) <= f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def _fit_at(points: Sequence[tuple[float, float]], q: float, mu: float, kappa: float | None) -> tuple:
    """(base, κ, Σ relative squared error) at a fixed μ: weighted linear least squares in x = tail/(μ − λ)."""
    tail = -math.log1p(-q)
    xs = [tail / (mu - r) for r, _ in points]
    ys = [t for _, t in points]
    ws = [1 / (t * t) for t in ys]
    if kappa is None and len(points) > 1:
        base, k = _nonnegative_line(xs, ys, ws)
    else:
        k = 1.0 if kappa is None else kappa
        base = max(0.0, sum(w * (y - k * x) for x, y, w in zip(xs, ys, ws, strict=True)) / sum(ws))
    sse = sum(w * (y - base - k * x) ** 2 for x, y, w in zip(xs, ys, ws, strict=True))
    return base, k, sse


def _nonnegative_line(xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]) -> tuple[float, float]:
    """(a, b) minimising Σ w(y − a − b·x)² subject to a ≥ 0, b ≥ 0 (two parameters: check the faces)."""
    sw = sum(ws)
    mx = sum(w * x for x, w in zip(xs, ws, strict=True)) / sw
    my = sum(w * y for y, w in zip(ys, ws, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for x, w in zip(xs, ws, strict=True))
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in zip(xs, ys, ws, strict=True))
    b = sxy / sxx if sxx > 0 else 0.0
    a = my - b * mx
    if b >= 0 and a >= 0:
        return a, b
    candidates = [(max(0.0, my), 0.0)]  # b = 0: a is the weighted mean
    x2 = sum(w * x * x for x, w in zip(xs, ws, strict=True))
    if x2 > 0:  # a = 0: regression through the origin
        candidates.append((0.0, max(0.0, sum(w * x * y for x, y, w in zip(xs, ys, ws, strict=True)) / x2)))

    def sse(ab: tuple[float, float]) -> float:
        return sum(w * (y - ab[0] - ab[1] * x) ** 2 for x, y, w in zip(xs, ys, ws, strict=True))

    return min(candidates, key=sse)


@dataclass(frozen=True)
class Plan:
    rate: float
    slo_s: float
    replicas: int              # the fewest that meet the SLO and the utilisation cap
    spare: int                 # extra for a disruption budget (N+spare)
    per_replica_rate: float
    utilisation: float         # of each of `replicas` at the planned rate
    predicted_s: float         # predicted quantile at the planned rate with `replicas`
    limited_by: str            # "slo" or "utilisation"

    @property
    def total(self) -> int:
        return self.replicas + self.spare


def _meets(fit: QueueFit, rate: float, n: int, slo_s: float, util_cap: float) -> bool:
    per = rate / n
    return per <= util_cap * fit.mu and fit.latency(per) <= slo_s


def plan(rate: float, slo_s: float, fit: QueueFit, *, util_cap: float = 0.8, spare: int = 0) -> Plan:
    """The smallest n with predicted quantile(rate/n) ≤ slo_s and rate/n ≤ util_cap·μ, plus `spare`.

    Raises InfeasibleSLO when the SLO is at or below one replica's latency at no load."""
    if rate < 0 or not 0 < util_cap <= 1 or spare < 0 or slo_s <= 0:
        raise ValueError(f"need rate >= 0, 0 < util_cap <= 1, spare >= 0, slo > 0; got {rate}, {util_cap}, "
                         f"{spare}, {slo_s}")
    if slo_s <= fit.floor_s:
        raise InfeasibleSLO(
            f"p{fit.q * 100:g} SLO {slo_s * 1e3:.2f} ms is at or below one replica's p{fit.q * 100:g} at no load "
            f"({fit.floor_s * 1e3:.2f} ms = base {fit.base_s * 1e3:.2f} ms + queueing "
            f"{(fit.floor_s - fit.base_s) * 1e3:.2f} ms): adding replicas cannot meet it; make each replica faster")
    per_replica = min(util_cap * fit.mu, fit.max_rate(slo_s))
    n = max(1, math.ceil(rate / per_replica))
    while n > 1 and _meets(fit, rate, n - 1, slo_s, util_cap):  # guard float rounding of the closed form
        n -= 1
    while not _meets(fit, rate, n, slo_s, util_cap):
        n += 1
    limited_by = "utilisation" if util_cap * fit.mu <= fit.max_rate(slo_s) else "slo"
    per = rate / n
    return Plan(rate, slo_s, n, spare, per, per / fit.mu, fit.latency(per), limited_by)


def fleet_table(fits: dict[str, QueueFit], rates: Sequence[float], slos_s: Sequence[float], *,
                baseline: str, util_cap: float = 0.8, spare: int = 1,
                mu_intervals: dict[str, tuple[float, float]] | None = None) -> list[dict]:
    """Per (rate, SLO): replicas per variant (total with spare, and the range over μ's interval) and the
    saving of every other variant against `baseline`."""
    rows = []
    for slo in slos_s:
        for rate in rates:
            row: dict = {"rate": rate, "slo_ms": slo * 1e3, "variants": {}}
            for name, fit in fits.items():
                try:
                    p = plan(rate, slo, fit, util_cap=util_cap, spare=spare)
                except InfeasibleSLO as exc:
                    row["variants"][name] = {"infeasible": str(exc)}
                    continue
                cell = {"replicas": p.replicas, "total": p.total, "limited_by": p.limited_by,
                        "utilisation": p.utilisation, "predicted_ms": p.predicted_s * 1e3}
                if mu_intervals and name in mu_intervals:
                    low, high = mu_intervals[name]
                    cell["total_range"] = [_total_or_none(rate, slo, fit.with_mu(high), util_cap, spare),
                                           _total_or_none(rate, slo, fit.with_mu(low), util_cap, spare)]
                row["variants"][name] = cell
            base = row["variants"].get(baseline, {})
            for name, cell in row["variants"].items():
                if name != baseline and "total" in cell and "total" in base:
                    cell["saving"] = base["total"] - cell["total"]
                    cell["saving_pct"] = 100.0 * cell["saving"] / base["total"]
            rows.append(row)
    return rows


def _total_or_none(rate: float, slo: float, fit: QueueFit, util_cap: float, spare: int) -> int | None:
    try:
        return plan(rate, slo, fit, util_cap=util_cap, spare=spare).total
    except (InfeasibleSLO, ValueError):
        return None


def fits_from_results(data: dict, q: float = 0.99) -> dict[str, QueueFit]:
    """Per-variant fits from `normfuse bench capacity`'s JSON (its "fits"), or fitted here from a
    `normfuse loadgen --json` file: its open-loop steps per label are the points, the best closed-loop
    throughput per label the fallback μ."""
    if "fits" in data:
        return {v: QueueFit(mu=f["mu"], base_s=f["base_ms"] / 1e3, kappa=f["kappa"], q=f["q"],
                            rms_rel_error=f.get("rms_rel_error", math.nan), points=f.get("points", 0))
                for v, f in data["fits"].items()}
    rows = data.get("results")
    if not isinstance(rows, list):
        raise ValueError("expected the JSON of `normfuse bench capacity` (with 'fits') or of "
                         "`normfuse loadgen --json` (with 'results')")
    fits = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label and r["ok"]]
        points = [(r["level"], r[f"p{q * 100:g}_ms"] / 1e3) for r in mine if r["mode"] == "open" and r["ok"] == r["sent"]]
        closed = [r["throughput_rps"] for r in mine if r["mode"] == "closed"]
        if points:
            fits[label] = fit_queue(points, q, mu_hint=max(closed) if closed else None)
    if not fits:
        raise ValueError("no open-loop step answered in full: run `normfuse loadgen ... --rates R1,R2,...`")
    return fits
