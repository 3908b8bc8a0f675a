"""The real thing, on loopback: `normfuse serve` with traffic, scraped by a real Prometheus running the
project's scrape config and recording rules; every rule and every dashboard query must return data.

Only the scrape target, the intervals (1 s) and the rules path differ from deploy/prometheus/prometheus.yml;
dashboard queries are evaluated with Grafana's variables substituted (promkit.TEST_VARIABLES).

The model serves exact variants, a lossy int8 variant and, where OpenVINO is installed, OpenVINO plans of the
same function (fp32, and bf16 where this CPU runs it natively), so the plan panels (engine and precision
joined from normfuse_engine_info) show ONNX Runtime and OpenVINO versions side by side.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engines.cpu import detect
from tests.deploy.promkit import (
    ROOT,
    compose,
    compose_binary,
    dashboard_targets,
    finite_values,
    instant_query,
    load_dashboard,
    load_rules,
    render_test_config,
    running_prometheus,
    substitute,
)
from tests.process import free_port, running
from tests.service import repo_builder

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)"),
]

DEADLINE_S = 45.0  # from the first request until every query must have returned data


@contextlib.contextmanager
def running_server(repo: Path, port: int, log_path: Path) -> Iterator[str]:
    """`normfuse serve` as a real process; yields its base URL once /v2/health/ready answers 200."""
    env = {**os.environ, "NORMFUSE_SHADOW_RATE": "1.0", "NORMFUSE_MAX_QUEUE_DELAY_MS": "5",
           "NORMFUSE_INTRA_OP_THREADS": "1", "NORMFUSE_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "normfuse.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, ready_url=f"{url}/v2/health/ready", log_path=log_path, env=env):
        yield url


class Traffic:
    """A few client threads sending requests to every variant (and some bad ones) until stopped."""

    def __init__(self, url: str, model: str, variants: list[str], threads: int = 3) -> None:
        self.url, self.model, self.variants = url, model, variants
        self.stop = threading.Event()
        self.codes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self, seed: int) -> None:
        with httpx.Client(timeout=10) as client:
            n = seed
            while not self.stop.is_set():
                n += 1
                variant = self.variants[(n // 10) % len(self.variants)]  # blocks of 10: every n % 10 on each
                rows = 1 + n % 3
                features = 5 if n % 10 == 0 else 4  # one in ten has a wrong shape -> 400
                body = {"inputs": [{"name": "x", "shape": [rows, features], "datatype": "FP32",
                                    "data": [float(i % 7) for i in range(rows * features)]}]}
                if n % 10 == 5:
                    # one in ten may wait 1 µs in the queue (Triton's `timeout` parameter): the batcher
                    # holds every first request for its 5 ms window, so it expires -> 504, i.e. shed
                    body["parameters"] = {"timeout": 1}
                try:
                    code = client.post(f"{self.url}/v2/models/{self.model}/versions/{variant}/infer",
                                       json=body).status_code
                except httpx.HTTPError:
                    code = -1
                with self._lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
                time.sleep(0.01)


def add_plans(model_dir: Path) -> list[str]:
    """Record the model's variants as plans and add OpenVINO plans of `affine` (the same x @ W file): fp32, and bf16
    (gated, reduced precision) where this CPU runs bf16 natively, as `normfuse convert` writes them; the served
    OpenVINO plans' names (none without OpenVINO)."""
    from engines.manifest import Manifest, read_manifest, write_manifest
    from engines.plans import Plan, PlanGate, PlanSet

    manifest = read_manifest(model_dir)
    plans = {name: Plan(name=name, variant=name, engine="onnxruntime", precision="fp32" if v.exact else "int8",
                        exact=v.exact, servable=v.servable) for name, v in manifest.variants.items()}
    if importlib.util.find_spec("openvino") is not None:
        plans["affine-ov-fp32"] = Plan(name="affine-ov-fp32", variant="affine", engine="openvino", precision="fp32",
                                       exact=True, servable=True)
        if detect().can_run_natively("bf16")[0]:  # integer inputs and weights: bf16 computes x @ W exactly here
            gate = PlanGate(passed=True, samples=64, rel_l2=0.0, cosine=1.0, top1_agreement=1.0,
                            gate={"min_top1_agreement": 0.995, "min_cosine": 0.9999})
            plans["affine-ov-bf16"] = Plan(name="affine-ov-bf16", variant="affine", engine="openvino",
                                           precision="bf16", exact=False, servable=True, gate=gate)
    manifest.plans = PlanSet(cpu=detect(), plans=plans, default=manifest.default_variant)
    write_manifest(model_dir, Manifest.model_validate(manifest.model_dump()))
    return [name for name, plan in plans.items() if plan.engine == "openvino"]


def queries() -> dict[str, str]:
    """label -> PromQL: every rule's expression, every recorded series, every dashboard query."""
    found = {}
    for rule in load_rules():
        found[f"rule expr {rule['record']}"] = rule["expr"]
        found[f"recorded {rule['record']}"] = rule["record"]
    for panel, target in dashboard_targets(load_dashboard()):
        found[f"panel {panel['title']!r} {target['refId']}"] = substitute(target["expr"])
    return found


def missing_data(url: str, exprs: dict[str, str]) -> dict[str, str]:
    """The queries that do not (yet) return at least one finite value, with what they returned."""
    missing = {}
    for label, expr in exprs.items():
        result = instant_query(url, expr)
        if not finite_values(result):
            missing[label] = f"{expr} -> {result}"
    return missing


def run_compose_loadgen(server: str, model: str) -> subprocess.CompletedProcess:
    """The compose `loadgen` service's own command (as `docker compose config` resolves it, with 1 s steps),
    pointed at `server` instead of http://server:8000."""
    config = compose("--profile", "loadgen", "config", "--format", "json",
                     extra_env={"NORMFUSE_MODEL_NAME": model, "LOADGEN_STEP_SECONDS": "1", "LOADGEN_CONCURRENCY": "2"})
    assert config.returncode == 0, config.stderr
    command = json.loads(config.stdout)["services"]["loadgen"]["command"]
    assert command[:3] == ["normfuse", "loadgen", "http://server:8000"]
    return subprocess.run([sys.executable, "-m", "normfuse.cli", "loadgen", server, *command[3:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_rules_and_dashboard_queries_return_data(tmp_path):
    repo = repo_builder.build_test_repo(tmp_path / "repo")
    shutil.rmtree(repo / repo_builder.BROKEN)  # the deliberately unloadable model has no metrics to show
    repo_builder.add_int8_variant(repo / repo_builder.MODEL)  # a real lossy variant for the "lossy vs exact" row
    plans = add_plans(repo / repo_builder.MODEL)  # OpenVINO plans for the "plans side by side" panels
    model, variants = repo_builder.MODEL, ["unfused", "affine", "int8", *plans]
    compared = sorted(set(variants) - {"unfused"})  # every version but the baseline is compared with it
    not_exact = sorted({"int8", "affine-ov-bf16"} & set(variants))  # lossy int8 and the reduced-precision plan

    server_port, prom_port = free_port(), free_port()
    config = render_test_config(tmp_path / "prometheus.yml", target=f"127.0.0.1:{server_port}",
                                self_target=f"127.0.0.1:{prom_port}")
    exprs = queries()
    with (running_server(repo, server_port, tmp_path / "server.log") as server,
          running_prometheus(config, tmp_path, prom_port) as prometheus,
          Traffic(server, model, variants) as traffic):
        deadline = time.monotonic() + DEADLINE_S
        while (missing := missing_data(prometheus, exprs)) and time.monotonic() < deadline:
            time.sleep(1)
        # the check itself can fail: a query for a model nobody serves is reported as missing
        assert missing_data(prometheus, {"control": 'normfuse:compute_duration_seconds:p50_1m{model="nope"}'})
        assert not missing, f"{len(missing)} of {len(exprs)} queries have no data (codes {traffic.codes}):\n" + \
            "\n".join(f"  {k}: {v}" for k, v in missing.items())

        # The scrape is the project's job, and the dashboard's model variable lists the served model.
        assert finite_values(instant_query(prometheus, 'up{job="normfuse"} == 1')) == [1.0]
        (variable,) = load_dashboard()["templating"]["list"]
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()
        values = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=5)
        assert values.json()["data"] == [model]

        # fused ÷ unfused joins one series per fused variant, never the baseline against itself.
        ratio = instant_query(prometheus, "normfuse:compute_duration_seconds:p50_ratio_to_unfused_1m")
        assert sorted(s["metric"]["variant"] for s in ratio) == compared
        assert all(v > 0 for v in finite_values(ratio))
        # affine and unfused compute x @ W from the same ONNX file: the shadow parity error is exactly 0.
        error = {s["metric"]["variant"]: finite_values([s]) for s in instant_query(prometheus, "normfuse:shadow_abs_error:p99_1m")}
        assert sorted(error) == compared and error["affine"] == [0.0]
        # The "lossy and reduced precision vs exact" row shows the versions that are not exact (int8 and a bf16
        # plan) only, with an agreement in (0, 1].
        for rule in ("lossy_shadow_agreement:mean_1m", "lossy_compute_duration_seconds:p50_ratio_to_unfused_1m",
                     "plan_shadow_agreement:mean_1m"):
            lossy = instant_query(prometheus, f"normfuse:{rule}")
            assert sorted(s["metric"]["variant"] for s in lossy) == not_exact, (rule, lossy)
        assert all(0 < v <= 1 for v in finite_values(instant_query(prometheus, "normfuse:lossy_shadow_agreement:mean_1m")))
        # The plan panels: one plan:info series per version with its engine and precision, joined onto the
        # shadow ratios of every compared version.
        info = {s["metric"]["variant"]: (s["metric"]["runtime"], s["metric"]["precision"], s["metric"]["exact"])
                for s in instant_query(prometheus, "normfuse:plan:info")}
        assert info == {"unfused": ("onnxruntime", "fp32", "true"), "affine": ("onnxruntime", "fp32", "true"),
                        "int8": ("onnxruntime", "int8", "false"),
                        **{p: ("openvino", p.rsplit("-", 1)[1], str(p.endswith("fp32")).lower()) for p in plans}}, info
        defaults = instant_query(prometheus, "normfuse:plan_default:pods")
        assert [(s["metric"]["variant"], finite_values([s])) for s in defaults] == [("affine", [1.0])], defaults
        paired = instant_query(prometheus, "normfuse:plan_shadow_latency_ratio:p50_1m")
        assert {s["metric"]["variant"]: (s["metric"]["runtime"], s["metric"]["precision"]) for s in paired} == \
            {v: info[v][:2] for v in compared}, paired
        # Bad requests count as errors by code; expired ones (504: their own queue timeout) as shed, per variant.
        codes = {s["metric"]["code"] for s in instant_query(prometheus, "normfuse:requests:rate1m")}
        assert codes >= {"200", "400", "504"}, codes
        # All of this traffic came over REST: the by-protocol rule says so.
        protocols = instant_query(prometheus, "normfuse:requests_by_protocol:rate1m")
        assert {s["metric"]["protocol"] for s in protocols} == {"http"}, protocols
        shed = instant_query(prometheus, "normfuse:requests_shed:ratio_1m")
        assert sorted(s["metric"]["variant"] for s in shed) == sorted(variants)
        assert all(0 < v < 1 for v in finite_values(shed)) and len(finite_values(shed)) == len(variants), shed
        # The compose loadgen profile's command drives this server: every variant gets successful requests.
        if compose_binary() is not None:
            loadgen = run_compose_loadgen(server, model)
            assert loadgen.returncode == 0, loadgen.stdout + loadgen.stderr
            lines = {line.split()[0]: line for line in loadgen.stdout.splitlines() if " ok " in line}
            assert sorted(lines) == sorted(variants), loadgen.stdout
            assert all(re.search(r"ok +[1-9]\d*/", line) for line in lines.values()), loadgen.stdout
    assert all(traffic.codes.get(code, 0) > 0 for code in (200, 400, 504)), traffic.codes
