"""deploy/prometheus: checked by the real promtool (config, rules, rule unit tests) and by reading the rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics
from tests.deploy.promkit import (
    PROMETHEUS_CONFIG,
    ROOT,
    RULES,
    dashboard_targets,
    load_dashboard,
    load_rules,
    render_test_config,
    substitute,
)

# The server's metric families (issue 5), all labelled model, variant, backend.
HISTOGRAMS = {
    "normfuse_request_duration_seconds",
    "normfuse_queue_duration_seconds",
    "normfuse_compute_duration_seconds",
    "normfuse_batch_size",
    "normfuse_shadow_latency_ratio",
    "normfuse_shadow_abs_error",
    "normfuse_shadow_agreement",
}
SERVER_METRICS = (
    {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | {"normfuse_requests_total", "normfuse_queue_depth", "normfuse_engine_info"}
)
METRIC_NAME = re.compile(r"\b(normfuse(?::[A-Za-z0-9_]+)+|normfuse_[A-Za-z0-9_]+)\b")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=60)


@needs_promtool
def test_promtool_accepts_config_and_rules():
    config = promtool("check", "config", PROMETHEUS_CONFIG)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout  # the relative rule_files path resolved
    rules = promtool("check", "rules", RULES)
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_rule_unit_tests_pass():
    """Ratios, means and the shed-rate zero fallback on synthetic series with known answers."""
    result = promtool("test", "rules", Path(__file__).with_name("rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rule_unit_tests_catch_a_wrong_rule(tmp_path):
    """The unit tests are not vacuous: inverting the fused/unfused ratio makes them fail."""
    broken = RULES.read_text().replace(
        'normfuse:compute_duration_seconds:p50_1m{variant!="unfused"}\n            / on (model) group_left ()\n'
        '          normfuse:compute_duration_seconds:p50_1m{variant="unfused"}',
        'normfuse:compute_duration_seconds:p50_1m{variant="unfused"}\n            / on (model) group_right ()\n'
        '          normfuse:compute_duration_seconds:p50_1m{variant!="unfused"}')
    assert broken != RULES.read_text()
    (tmp_path / "rules.yml").write_text(broken)
    spec = yaml.safe_load(Path(__file__).with_name("rules_test.yml").read_text())
    spec["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(spec))
    result = promtool("test", "rules", tmp_path / "rules_test.yml")
    assert result.returncode != 0
    assert "p50_ratio_to_unfused_1m" in result.stdout + result.stderr


@needs_promtool
def test_rendered_test_config_is_valid(tmp_path):
    """The live test's variant of the config (1 s intervals, loopback target) is still a valid config."""
    path = render_test_config(tmp_path / "prometheus.yml", target="127.0.0.1:8000", self_target="127.0.0.1:9090")
    result = promtool("check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "1s"
    assert yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"] == "5s"  # source untouched


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each dashboard query (Grafana variables substituted) as a recording rule."""
    exprs = [substitute(target["expr"]) for _, target in dashboard_targets(load_dashboard())]
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_recording_rules_are_named_and_reference_real_series():
    rules = load_rules()
    names = [rule["record"] for rule in rules]
    assert all(name.startswith("normfuse:") for name in names), names
    assert len(names) == len(set(names)), "duplicate recording rule names"
    assert not [rule for rule in rules if "alert" in rule], "alerts would be empty when all is well"
    defined = set(names)
    for rule in rules:
        for metric in METRIC_NAME.findall(rule["expr"]):
            assert metric in SERVER_METRICS | defined, f"{rule['record']}: unknown series {metric}"
        assert "1 +" not in rule["expr"] and "1+" not in rule["expr"], "no 1+ trick: it biases low traffic"


def test_rules_cover_what_the_issue_asks_for():
    names = {rule["record"] for rule in load_rules()}
    for family in ("compute_duration_seconds", "request_duration_seconds"):
        for q in ("p50", "p95", "p99"):
            assert f"normfuse:{family}:{q}_1m" in names
    assert "normfuse:compute_duration_seconds:p50_ratio_to_unfused_1m" in names  # fused ÷ unfused per model
    assert "normfuse:shadow_latency_ratio:p50_1m" in names  # paired shadow ratio
    assert "normfuse:batch_size:mean_1m" in names
    assert "normfuse:requests_shed:ratio_1m" in names
    assert "normfuse:requests_by_protocol:rate1m" in names  # REST and gRPC traffic apart


def test_only_series_with_a_protocol_label_are_split_by_it():
    """protocol (http | grpc) is on the request counter and the request histogram only; a rule or panel that
    grouped another family by it would silently return nothing."""
    metrics = Metrics()
    assert "protocol" in metrics.requests._labelnames and "protocol" in metrics.request._labelnames
    assert "protocol" not in metrics.compute._labelnames and "protocol" not in metrics.queue._labelnames
    with_protocol = {"normfuse_requests_total", "normfuse_request_duration_seconds_bucket",
                     "normfuse:requests_by_protocol:rate1m"}
    exprs = [rule["expr"] for rule in load_rules()] + [t["expr"] for _, t in dashboard_targets(load_dashboard())]
    split = [e for e in exprs if re.search(r"\bprotocol\b", e)]
    assert split, "nothing shows requests by protocol"
    for expr in split:
        assert set(METRIC_NAME.findall(expr)) <= with_protocol, expr


def test_dashboard_references_only_real_series():
    defined = {rule["record"] for rule in load_rules()}
    for panel, target in dashboard_targets(load_dashboard()):
        for metric in METRIC_NAME.findall(target["expr"]):
            assert metric in SERVER_METRICS | defined, f"panel {panel['title']!r}: unknown series {metric}"


def test_known_series_are_what_the_server_registers():
    """SERVER_METRICS above matches the server's own registry (service/metrics.py), family by family."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {family.name + suffix for family in Metrics().registry.collect()
                for suffix in suffixes.get(family.type, ("",))}
    assert SERVER_METRICS <= exported, sorted(SERVER_METRICS - exported)
