"""The capacity model's math: textbook queueing values, the fit, the planner's minimality and refusals."""

import math

import pytest

from benchmarks.capacity_model import (
    InfeasibleSLO,
    QueueFit,
    fit_queue,
    fleet_table,
    kingman_wait,
    mm1_queue_length,
    mm1_sojourn_quantile,
    mm1_wait_quantile,
    plan,
    utilisation_where,
)


def test_mm1_quantiles_are_the_textbook_values():
    # M/M/1 with μ = 10/s, λ = 5/s: time in system ~ Exp(5), mean 0.2 s, median ln 2 / 5, p99 ln 100 / 5
    assert mm1_sojourn_quantile(5, 10, 0.5) == pytest.approx(math.log(2) / 5)
    assert mm1_sojourn_quantile(5, 10, 0.99) == pytest.approx(math.log(100) / 5)
    assert mm1_sojourn_quantile(0, 10, 0.99) == pytest.approx(0.4605, abs=1e-4)
    assert mm1_sojourn_quantile(10, 10, 0.99) == math.inf
    with pytest.raises(ValueError):
        mm1_sojourn_quantile(1, 10, 1.0)


def test_kingman_is_exact_for_mm1_and_halves_for_deterministic_service():
    lam, mu = 6.0, 10.0
    assert kingman_wait(lam, mu) == pytest.approx(lam / (mu * (mu - lam)))  # M/M/1 Wq = ρ/(μ − λ)
    assert kingman_wait(lam, mu, cs2=0.0) == pytest.approx(kingman_wait(lam, mu) / 2)  # M/D/1 (P-K)
    assert kingman_wait(mu, mu) == math.inf


def test_queue_fit_is_monotone_and_diverges_at_saturation():
    fit = QueueFit(mu=1000, base_s=0.002, kappa=0.7)
    rates = [0, 100, 300, 600, 900, 990]
    latencies = [fit.latency(r) for r in rates]
    assert latencies == sorted(latencies) and len(set(latencies)) == len(latencies)
    assert fit.floor_s == pytest.approx(0.002 + 0.7 * math.log(100) / 1000)
    assert fit.latency(1000) == math.inf
    # max_rate inverts latency
    assert fit.latency(fit.max_rate(0.02)) == pytest.approx(0.02)
    assert fit.max_rate(fit.floor_s) == 0.0


def test_fit_recovers_mu_and_base_of_noise_free_mm1_points():
    truth = QueueFit(mu=800, base_s=0.003, kappa=1.0)
    points = [(r, truth.latency(r)) for r in (80, 240, 400, 560, 720)]
    fit = fit_queue(points)  # κ = 1: (μ, base) fitted
    assert fit.mu == pytest.approx(800, rel=1e-4)
    assert fit.base_s == pytest.approx(0.003, rel=1e-3)
    assert fit.rms_rel_error < 1e-4 and fit.points == 5


def test_fit_recovers_kappa_and_base_at_a_fixed_mu():
    truth = QueueFit(mu=800, base_s=0.003, kappa=0.6)
    points = [(r, truth.latency(r)) for r in (80, 240, 400, 560, 720)]
    fit = fit_queue(points + [(900, 1.0)], mu=800, kappa=None)  # the point beyond μ is dropped
    assert fit.points == 5
    assert fit.base_s == pytest.approx(0.003, rel=1e-9)
    assert fit.kappa == pytest.approx(0.6, rel=1e-9)
    assert fit.rms_rel_error == pytest.approx(0.0, abs=1e-9)


def test_fit_falls_back_to_the_measured_saturation_when_no_queueing_shows():
    flat = [(100, 0.004), (200, 0.004), (300, 0.004)]
    assert fit_queue(flat, mu_hint=5000).mu == 5000
    assert fit_queue(flat).mu > 20 * 300 * 0.99  # no hint: the edge of the search, i.e. "no queue seen"


def test_fit_keeps_parameters_nonnegative():
    # latency falling with load (batching amortises) would give κ < 0: clamp to κ = 0, base = the mean
    fit = fit_queue([(100, 0.004), (500, 0.004), (800, 0.004 * 0.999)], mu=1000, kappa=None)
    assert fit.kappa == 0 and fit.base_s == pytest.approx(0.004, rel=1e-3)
    # a steep curve with tiny latency at low load would give base < 0: fit through the origin instead
    fit = fit_queue([(0, 0.0001), (900, 0.2)], mu=1000, kappa=None)
    assert fit.base_s == 0 and fit.kappa > 0
    one = fit_queue([(500, 0.05)], mu=1000)  # κ = 1 and one point: the base is the rest
    assert one.kappa == 1 and one.base_s == pytest.approx(0.05 - math.log(100) / 500)
    with pytest.raises(ValueError, match="no measured point"):
        fit_queue([(1000, 0.1)], mu=1000)
    with pytest.raises(ValueError, match="beyond the saturation"):
        fit_queue([(100, 0.004), (200, 0.004)], mu_hint=50)


def test_plan_is_minimal_and_meets_both_limits():
    fit = QueueFit(mu=1000, base_s=0.002, kappa=1.0)
    for rate in (1, 999, 5000, 12_345, 100_000):
        for slo in (0.008, 0.05):
            p = plan(rate, slo, fit, util_cap=0.8)
            assert p.predicted_s <= slo and p.utilisation <= 0.8 + 1e-12
            if p.replicas > 1:  # one fewer replica misses a limit
                fewer = rate / (p.replicas - 1)
                assert fewer > 0.8 * fit.mu or fit.latency(fewer) > slo
    # a loose SLO: the utilisation cap decides (100k / 800 = 125); a tight one: the SLO decides
    assert plan(100_000, 0.05, fit, util_cap=0.8).replicas == 125
    tight = plan(100_000, 0.008, fit, util_cap=0.8)
    assert tight.limited_by == "slo" and tight.replicas == math.ceil(100_000 / fit.max_rate(0.008))
    assert plan(100_000, 0.05, fit, util_cap=0.8).limited_by == "utilisation"


def test_plan_monotone_in_rate_and_spare_adds_replicas():
    fit = QueueFit(mu=500, base_s=0.004, kappa=0.8)
    counts = [plan(r, 0.03, fit).replicas for r in range(0, 20_000, 250)]
    assert counts == sorted(counts) and counts[0] == 1
    p = plan(10_000, 0.03, fit, spare=1)
    assert p.total == p.replicas + 1


def test_plan_refuses_an_slo_below_the_base_latency():
    fit = QueueFit(mu=1000, base_s=0.005, kappa=1.0)
    with pytest.raises(InfeasibleSLO, match=r"SLO 4.00 ms is at or below one replica's p99 at no load \(9.61 ms"):
        plan(10, 0.004, fit)
    with pytest.raises(InfeasibleSLO):  # between base and floor: the queue alone at λ → 0 breaks it
        plan(10, 0.009, fit)
    with pytest.raises(ValueError):
        plan(10, 0.05, fit, util_cap=1.5)


def test_fleet_table_counts_savings_and_ranges():
    fits = {"unfused": QueueFit(mu=1000, base_s=0.002), "rmsnorm": QueueFit(mu=1100, base_s=0.002)}
    rows = fleet_table(fits, [10_000, 100_000], [0.05, 0.003], baseline="unfused", spare=1,
                       mu_intervals={"unfused": (950, 1050), "rmsnorm": (1000, 1200)})
    loose = {(r["rate"], r["slo_ms"]): r for r in rows}[(100_000, 50.0)]["variants"]
    assert loose["unfused"]["total"] == 126 and loose["rmsnorm"]["total"] == 115  # ceil(100k/880) + 1
    assert loose["rmsnorm"]["saving"] == 11 and loose["rmsnorm"]["saving_pct"] == pytest.approx(100 * 11 / 126)
    low, high = loose["unfused"]["total_range"]
    assert low <= loose["unfused"]["total"] <= high and low < high
    infeasible = [r for r in rows if r["slo_ms"] == 3.0][0]["variants"]
    assert "infeasible" in infeasible["unfused"] and "saving" not in infeasible["rmsnorm"]


def test_mm1_queue_metrics_the_hpa_scales_on():
    assert mm1_queue_length(0.5) == pytest.approx(0.5)  # ρ²/(1 − ρ)
    assert mm1_queue_length(0.8) == pytest.approx(3.2)
    assert mm1_queue_length(1.0) == math.inf
    # P(W > t) = ρ e^{−(μ−λ)t}: at ρ = 0.8, μ = 100, the p95 wait is ln(16)/20
    assert mm1_wait_quantile(80, 100, 0.95) == pytest.approx(math.log(16) / 20)
    assert mm1_wait_quantile(4, 100, 0.95) == 0.0  # only 4% of requests wait at all
    rho = utilisation_where(mm1_queue_length, 8.0)
    assert mm1_queue_length(rho) == pytest.approx(8.0, rel=1e-6) and 0.88 < rho < 0.9
    assert utilisation_where(lambda r: r, 2.0) > 0.999  # never reached: the top of the range
