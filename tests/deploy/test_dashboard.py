"""deploy/grafana: the dashboard JSON and the provisioning files, checked structurally.

Grafana cannot be installed here; test_live_prometheus.py evaluates every query against a real Prometheus.
"""

from __future__ import annotations

from itertools import combinations

import yaml

from tests.deploy.promkit import (
    DATASOURCES,
    DEPLOY,
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard_targets,
    load_dashboard,
    load_rules,
)


def datasource() -> dict:
    (only,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return only


def test_provisioned_datasource_is_the_compose_prometheus():
    ds = datasource()
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "prometheus" in compose["services"]
    assert ds["url"] == "http://prometheus:9090"
    # Grafana's $__rate_interval is derived from timeInterval: it must be the real scrape interval.
    assert ds["jsonData"]["timeInterval"] == yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]


def test_every_panel_and_query_uses_the_provisioned_datasource():
    uid = datasource()["uid"]
    dashboard = load_dashboard()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
    for panel, target in dashboard_targets(dashboard):
        assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_panel_ids_are_unique_and_every_panel_has_a_query():
    panels = load_dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel["type"] != "row", "rows have no query; keep the dashboard flat"
        assert panel["title"] and panel.get("description"), panel["id"]
        targets = panel["targets"]
        assert targets and all(t["expr"].strip() for t in targets), panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_panels_fit_the_grid_without_overlapping():
    panels = load_dashboard()["panels"]
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
    for a, b in combinations(panels, 2):
        pa, pb = a["gridPos"], b["gridPos"]
        overlap_x = pa["x"] < pb["x"] + pb["w"] and pb["x"] < pa["x"] + pa["w"]
        overlap_y = pa["y"] < pb["y"] + pb["h"] and pb["y"] < pa["y"] + pa["h"]
        assert not (overlap_x and overlap_y), f"{a['title']!r} overlaps {b['title']!r}"


def test_dashboard_shows_what_the_issue_asks_for():
    """Fused vs unfused percentiles, paired shadow ratio, parity, throughput, batch sizes, queue, errors."""
    panels = load_dashboard()["panels"]
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in panels}

    def panel_with(*needles: str) -> str:
        hits = [title for title, expr in exprs.items() if all(n in expr for n in needles)]
        assert hits, f"no panel queries {needles}"
        return hits[0]

    for family in ("compute", "request"):
        title = panel_with(f"normfuse_{family}_duration_seconds_bucket", "0.50", "0.95", "0.99")
        assert "variant" in exprs[title]  # split by variant: fused and unfused side by side
    panel_with("ratio_to_unfused")
    panel_with("normfuse:shadow_latency_ratio")
    panel_with("normfuse_shadow_abs_error")
    panel_with("normfuse_requests_total", 'code=~"2.."')
    assert any(p["type"] == "heatmap" and "normfuse_batch_size_bucket" in exprs[p["title"]] for p in panels)
    panel_with("normfuse_queue_depth")
    assert "sum by (code)" in exprs[panel_with("normfuse_requests_total", 'code!~"2.."')]  # errors by code
    panel_with("requests_shed")
    panel_with("normfuse_requests_total", "by (protocol")  # REST and gRPC traffic apart
    panel_with("normfuse_request_duration_seconds_bucket", "le, protocol")


def test_model_variable_lists_served_models():
    (variable,) = load_dashboard()["templating"]["list"]
    assert variable["name"] == "model" and variable["includeAll"] and variable["allValue"] == ".*"
    # the engine info series exists from startup, so a model is listed before its first request
    assert variable["query"]["query"] == "label_values(normfuse_engine_info, model)" == variable["definition"]


def test_dashboard_provider_reads_the_directory_compose_mounts():
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/normfuse.yml").read_text())["providers"][0]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(reversed(volume.split(":")[:2]) for volume in grafana["volumes"])  # target -> source
    source = mounts[provider["options"]["path"]]
    assert (ROOT / source / "normfuse.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/normfuse.json"
    assert (ROOT / mounts["/etc/grafana/provisioning"] / "datasources" / DATASOURCES.name).is_file()


def test_plans_are_shown_side_by_side_with_their_engine_and_precision():
    """A plan is variant × engine × precision: the panels that compare versions with unfused carry the engine and
    precision by joining normfuse_engine_info (normfuse:plan_* rules), and say them in the legend; the table lists
    every version with both beside its figures."""
    panels = load_dashboard()["panels"]
    plan_panels = [p for p in panels if any("normfuse:plan" in t["expr"] for t in p["targets"])]
    (table,) = [p for p in plan_panels if p["type"] == "table"]
    exprs = [t["expr"] for t in table["targets"]]
    assert exprs[0].startswith("normfuse:plan:info")  # every version's engine and precision, first
    for needle in ("compute_duration_seconds", "shadow_latency_ratio", "shadow_abs_error", "shadow_agreement"):
        assert any(needle in e for e in exprs), needle
    assert all(t.get("format") == "table" and t.get("instant") for t in table["targets"])
    assert [step["id"] for step in table["transformations"]][0] == "merge"  # one row per version
    series = [p for p in plan_panels if p["type"] == "timeseries"]
    assert len(series) >= 4, [p["title"] for p in series]
    for panel in series:
        for target in panel["targets"]:
            assert "{{precision}}" in target["legendFormat"] and "{{runtime}}" in target["legendFormat"], panel["title"]


def test_plan_rules_join_on_model_and_variant_and_keep_cardinality_bounded():
    """normfuse:plan:info keeps only (model, variant, runtime, precision, exact) — one series per version — and
    every other plan rule joins it on (model, variant), adding the engine and precision."""
    rules = {rule["record"]: " ".join(rule["expr"].split()) for rule in load_rules()}
    assert rules["normfuse:plan:info"] == "max by (model, variant, runtime, precision, exact) (normfuse_engine_info)"
    # pods per default version: counted by the same labels (a mixed pool's pods may differ in it, so `default`
    # is never a label of plan:info, which must stay one series per version)
    assert rules.pop("normfuse:plan_default:pods") == \
        'count by (model, variant, runtime, precision, exact) (normfuse_engine_info{default="true"})'
    joined = [name for name in rules if name.startswith("normfuse:plan_")]
    assert len(joined) >= 5, joined
    for name in joined:
        assert "* on (model, variant) group_left (runtime, precision, exact) normfuse:plan:info" in rules[name], name
