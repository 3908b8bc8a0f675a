"""deploy/k8s checked without a cluster: each overlay rendered by the real `kubectl kustomize` and every object
validated against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict); then the cross-references a
real deploy depends on, checked against the real thing they name (the FastAPI app's routes, the Settings
class, the `normfuse` CLI parser, the metrics registry, convert's move_into_place, `promtool`).

Objects of CRD kinds (the ServiceMonitor) have no schema there: they are checked field by field against
what the Prometheus Operator reads. The HPA's PromQL (prometheus-adapter's rules) runs at the end, against a
real Prometheus running the pod-annotation scrape job on a real `normfuse serve` started as the Deployment
starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.deploy.k8skit import (
    ADAPTER_VALUES,
    KEDA_OVERLAYS,
    OVERLAYS,
    SCRAPE_CONFIG,
    adapter_rules,
    config_map,
    container,
    container_env,
    expand,
    find,
    loopback_scrape_config,
    normfuse_parser,
    one,
    pod_spec,
    render,
    render_metrics_query,
    render_with_components,
    scrape_config,
    secret_value,
    series_name,
)
from tests.deploy.promkit import instant_query, running_prometheus
from tests.process import free_port, running
from tests.service import repo_builder

KUBERNETES_VERSIONS = ("1.30", "1.33")  # the oldest minor still maintained upstream when written, and a current one
EXPECTED_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Job", "Deployment",
                  "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
UID = 10001  # the images' user (deploy/Dockerfile.*)


def server(objects):
    return one(objects, "Deployment", "normfuse-server")


def job(objects):
    return one(objects, "Job", "normfuse-convert")


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as a number: "2" -> 2, "500m" -> 0.5, "20m" -> 0.02."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- schemas --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(overlay, version):
    objects = render(overlay)
    assert {o["kind"] for o in objects} == EXPECTED_KINDS
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version}: {exc}")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] != "Namespace")


def test_validation_catches_a_misspelt_field():
    """The control: strict validation rejects what the API server would (a typo'd probe field)."""
    deployment = server(render("cpu"))
    pod_spec(deployment)["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": "http"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# -- what selects what ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_targets_match_the_server_pods(overlay):
    objects = render(overlay)
    deployment = server(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = one(objects, "Service", "normfuse-server")
    assert service["spec"]["selector"] and subset(service["spec"]["selector"], pod_labels)
    pdb = one(objects, "PodDisruptionBudget")
    assert subset(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    for constraint in pod_spec(deployment)["topologySpreadConstraints"]:
        assert subset(constraint["labelSelector"]["matchLabels"], pod_labels)
    # the convert Job's pods are not server pods: the Service must not send them traffic
    assert not subset(service["spec"]["selector"], job(objects)["spec"]["template"]["metadata"]["labels"])

    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        (deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]

    ports = {p["name"]: p["containerPort"] for p in container(deployment, "server")["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc"}  # OIP v2 over REST and over gRPC
    assert all(p["targetPort"] in ports for p in service_ports.values())
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"  # gRPC: HTTP/2 in plaintext

    # every volume a container mounts exists, and the repository claim is the rendered PVC
    claim = one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    for workload in (deployment, job(objects)):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{c['name']} mounts unknown volume {mount['name']}"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
        assert spec["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


class App:
    """The real app (not started: no models loaded), asked over ASGI whether it routes a GET path. A route
    answers anything but 404/405 (/v2/health/ready answers 503 until the lifespan has loaded the models)."""

    def __init__(self, tmp_path: Path) -> None:
        from service.app import create_app
        from service.settings import Settings

        self.app = create_app(Settings(repo=tmp_path))

    def serves(self, path: str) -> bool:
        async def get() -> int:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://k8s") as client:
                return (await client.get(path)).status_code

        return asyncio.run(get()) not in (404, 405)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scrape_annotations_name_routes_the_app_serves(overlay, tmp_path):
    app = App(tmp_path)
    assert not app.serves("/v2/health/nonexistent")  # the control
    deployment = server(render(overlay))
    serve = container(deployment, "server")
    ports = {p["name"]: p["containerPort"] for p in serve["ports"]}
    probes = {kind: serve[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    for kind, probe in probes.items():
        assert app.serves(probe["path"]), f"{kind} probes {probe['path']}, which the app does not serve"
        assert probe["port"] in ports, f"{kind} probes port {probe['port']!r}, not a named container port"
    # liveness is the conservative one: at least 30 s of misses before a restart
    liveness = serve["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert app.serves(annotations["prometheus.io/path"])
    assert int(annotations["prometheus.io/port"]) == ports["http"]


# -- settings and command lines -------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_environment_is_settings_normfuse_serve_accepts(overlay, tmp_path, monkeypatch):
    from service.cli import unknown_variables
    from service.settings import Settings

    objects = render(overlay)
    settings_map = config_map(objects, "normfuse-server")
    assert all(key.startswith("NORMFUSE_") for key in settings_map)
    unknown = [k for k in settings_map if k[len("NORMFUSE_"):].lower() not in Settings.model_fields]
    assert not unknown, f"not Settings fields: {unknown}"

    serve = container(server(objects), "server")
    env = container_env(objects, serve)
    assert unknown_variables(env) == [], "`normfuse serve` would warn about these"
    for key in [k for k in os.environ if k.startswith("NORMFUSE_")]:
        monkeypatch.delenv(key)
    fields = {key[len("NORMFUSE_"):].lower(): value for key, value in settings_map.items()}
    explicit = Settings(repo=tmp_path, **fields)  # the values as given, parsed by the same validators
    for key, value in settings_map.items():
        monkeypatch.setenv(key, value)
    settings = Settings(repo=tmp_path)  # from the environment, as the pod starts; raises on a bad value
    assert {f: getattr(settings, f) for f in fields} == {f: getattr(explicit, f) for f in fields}
    assert settings.drain_timeout_s == float(settings_map["NORMFUSE_DRAIN_TIMEOUT_S"])

    requests = serve["resources"]["requests"]
    if overlay == "cpu":  # engine threads match the cores asked for
        assert settings.backend == "onnxruntime"
        assert settings.intra_op_threads == quantity(requests["cpu"]) == quantity(serve["resources"]["limits"]["cpu"])
    else:
        assert settings.backend == "tensorrt"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("mode", ["none", "poll", "explicit"])
def test_the_repository_api_needs_the_key_from_a_secret_in_every_mode(overlay, mode, tmp_path, monkeypatch):
    """The server's environment restricts model-repository with a key that only a Secret holds, whatever model
    control mode the ConfigMap sets (an overlay turning it on cannot leave the API open)."""
    from service.settings import Settings

    objects = render(overlay)
    assert not find(objects, "Secret"), "the key is never committed: the Secret is created in the cluster"
    env = container_env(objects, container(server(objects), "server")) | {"NORMFUSE_MODEL_CONTROL_MODE": mode}
    for key in [k for k in os.environ if k.startswith("NORMFUSE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("NORMFUSE_"):
            monkeypatch.setenv(key, value)
    settings = Settings(repo=tmp_path)
    [restriction] = settings.restricted_api
    assert restriction.groups == ("model-repository",) and settings.model_control_mode == mode
    assert restriction.key == secret_value("normfuse-repository-api", "key").encode()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_parse_with_the_normfuse_cli(overlay):
    objects = render(overlay)
    parser, commands = normfuse_parser()
    model = config_map(objects, "normfuse-model")

    convert = container(job(objects), "convert")
    argv = expand(convert["command"], container_env(objects, convert))
    assert argv[0] == "normfuse" and argv[1] in commands
    args = parser.parse_args(argv[1:])
    assert (args.command, args.source, args.name, str(args.repo)) == \
        ("convert", model["NORMFUSE_MODEL"], model["NORMFUSE_MODEL_NAME"], "/models")
    assert args.backend == ("tensorrt" if overlay == "gpu" else "onnxruntime")
    assert "/models" in {m["mountPath"] for m in convert["volumeMounts"] if not m.get("readOnly")}

    serve = container(server(objects), "server")
    argv = expand(serve["command"], container_env(objects, serve))
    args = parser.parse_args(argv[1:])
    assert (args.command, args.repo, args.host) == ("serve", "/models", "0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in serve["ports"]}
    assert int(args.port) == ports["http"]  # the flags are strings; Settings converts them
    from service.settings import Settings

    grpc_port = args.grpc_port or container_env(objects, serve).get("NORMFUSE_GRPC_PORT")
    assert int(grpc_port or Settings.model_fields["grpc_port"].default) == ports["grpc"]  # the port gRPC serves
    assert {m["mountPath"]: m.get("readOnly", False) for m in serve["volumeMounts"]}["/models"] is True


def _wait_script(objects) -> str:
    wait = container(server(objects), "wait-for-model")
    assert wait["command"][:2] == ["sh", "-c"]
    return wait["command"][2]


def test_server_waits_for_the_marker_the_job_writes(tmp_path):
    """The Job's last step creates exactly the file the server's init container waits for. Both run for real
    (sh, touch), with /models moved to a temporary directory."""
    objects = render("cpu")
    models = tmp_path / "models"
    model_env = config_map(objects, "normfuse-model")
    (models / model_env["NORMFUSE_MODEL_NAME"]).mkdir(parents=True)
    mark = container(job(objects), "mark-converted")
    wait = container(server(objects), "wait-for-model")
    script = _wait_script(objects).replace("/models/", f"{models}/")
    env = {"PATH": "/usr/bin:/bin", **container_env(objects, wait)}
    # the real loop would wait 30 min: 2 rounds without sleeping show how it ends when the Job never finishes
    quick = script.replace("$(seq 360)", "$(seq 2)").replace("sleep 5", "sleep 0")
    assert quick != script
    missing = subprocess.run(["sh", "-c", quick], env=env, capture_output=True, text=True, timeout=10)
    assert missing.returncode == 1 and "gave up" in missing.stderr

    touch = [arg.replace("/models/", f"{models}/") for arg in expand(mark["command"], container_env(objects, mark))]
    subprocess.run(touch, check=True, timeout=10)
    found = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)
    assert found.returncode == 0 and "found" in found.stdout, found.stderr


def test_a_new_conversion_removes_the_marker_until_it_is_done_too(tmp_path):
    """The marker lives inside REPO/NAME: convert's move_into_place swaps the whole directory, so servers
    starting during a re-conversion wait for the new one instead of loading a half-built one."""
    from convert.staging import move_into_place

    final = tmp_path / "vit-digits"
    final.mkdir()
    (final / ".converted").touch()
    staging = tmp_path / ".vit-digits.partial-x"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    move_into_place(staging, final)
    assert (final / "manifest.json").is_file() and not (final / ".converted").exists()


# -- draining, security, GPUs ---------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_pre_stop_and_both_drains(overlay):
    objects = render(overlay)
    deployment = server(objects)
    serve = container(deployment, "server")
    command = serve["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach every proxy"
    drain = float(config_map(objects, "normfuse-server")["NORMFUSE_DRAIN_TIMEOUT_S"])
    # service/cli.py: uvicorn's graceful shutdown waits up to round(drain) for open requests, then the
    # lifespan drains the batchers for up to drain again
    needed = pre_stop + max(1, round(drain)) + drain
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= needed + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted(overlay):
    objects = render(overlay)
    for workload in (server(objects), job(objects)):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID and pod["runAsGroup"] == UID
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{name}/{c['name']}"
            assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"], c["name"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        # Python code runs here with a read-only root: $HOME and caches must point at a writable emptyDir
        for c in spec["containers"] + spec.get("initContainers", []):
            if c["command"][0] != "normfuse":
                continue
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{name}/{c['name']}: /tmp is not an emptyDir"
            env = container_env(objects, c)
            for variable in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
                assert env[variable].startswith("/tmp"), f"{name}/{c['name']}: {variable}"
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _gpus(spec: dict) -> list[str]:
    return [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]


def test_gpu_overlay_requests_a_gpu_and_the_cpu_overlay_does_not():
    cpu, gpu = render("cpu"), render("gpu")
    assert "nvidia.com" not in yaml.safe_dump(cpu)
    assert _gpus(pod_spec(server(gpu))) == ["server"]
    assert _gpus(pod_spec(job(gpu))) == ["convert"]  # plans are built on a GPU...
    for workload in (server(gpu), job(gpu)):
        for c in [*pod_spec(workload).get("initContainers", []), *pod_spec(workload)["containers"]]:
            if "nvidia.com/gpu" in c["resources"]["limits"]:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # ...of the product the servers run on (a plan is tied to the GPU model)
    selectors = [pod_spec(w)["nodeSelector"] for w in (server(gpu), job(gpu))]
    assert selectors[0] == selectors[1] and "nvidia.com/gpu.product" in selectors[0]
    assert all(t["key"] == "nvidia.com/gpu" for w in (server(gpu), job(gpu)) for t in pod_spec(w)["tolerations"])
    images = {c["image"] for objs, tag in ((cpu, "cpu"), (gpu, "gpu")) for w in (server(objs), job(objs))
              for c in [*pod_spec(w).get("initContainers", []), *pod_spec(w)["containers"]]}
    assert images == {"normfuse:0.1.0-cpu", "normfuse:0.1.0-gpu"}
    startup = {name: container(server(o), "server")["startupProbe"] for name, o in (("cpu", cpu), ("gpu", gpu))}
    budget = {k: p["periodSeconds"] * p["failureThreshold"] for k, p in startup.items()}
    assert budget["gpu"] > budget["cpu"] >= 60  # plan deserialization and warm-up take longer


# -- monitoring -----------------------------------------------------------------------------------
def test_hpa_metrics_are_the_adapter_rules_and_the_server_exports_their_series():
    from service.metrics import Metrics

    exported = {sample.name for family in Metrics().registry.collect() for sample in family.samples} | \
        {family.name for family in Metrics().registry.collect()}
    rules = adapter_rules()
    served = {}
    for rule in rules:
        series = series_name(rule)
        assert re.fullmatch(rule["name"]["matches"], series), f"{rule['name']} does not rename {series}"
        assert series in exported or re.sub(r"_bucket$", "", series) in exported, f"no metric {series}"
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert all(t in rule["metricsQuery"] for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"))
        served[rule["name"]["as"]] = rule
    for overlay in OVERLAYS:
        hpa = one(render(overlay), "HorizontalPodAutoscaler")
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert sorted(names) == sorted(served), f"HPA metrics {names} vs adapter rules {sorted(served)}"
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["target"]["type"] == "AverageValue"
            assert 0 < quantity(metric["pods"]["target"]["averageValue"]) < math.inf


def test_helm_values_carry_the_same_adapter_rules():
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["custom"] == adapter_rules()
    assert values["prometheus"]["url"].startswith("http") and isinstance(values["prometheus"]["port"], int)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_component_scrapes_the_server_service(overlay, tmp_path):
    """The ServiceMonitor, field by field as the Prometheus Operator reads it (no schema for CRDs here)."""
    objects = render_with_components(overlay, ["servicemonitor"], tmp_path)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(objects, "Service", "normfuse-server")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                                    "podTargetLabels", "sampleLimit"}
    assert monitor["spec"]["selector"]["matchLabels"] and \
        subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert not find([o for o in objects if o is not service], "Service")  # nothing else it could select
    port_names = {p["name"] for p in service["spec"]["ports"]}
    app = App(tmp_path)
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert app.serves(endpoint["path"])
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
        assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])
    # everything else in the overlay is unchanged by the component
    assert {o["kind"] for o in objects} == EXPECTED_KINDS | {"ServiceMonitor"}


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_overlays_swap_the_hpa_for_an_equivalent_scaled_object(overlay):
    """overlays/*-keda: every non-CRD object valid and unchanged but the HPA, which is gone; the ScaledObject
    (checked field by field as KEDA reads it) carries the HPA's bounds, behaviour, metrics and targets."""
    objects, plain = render(overlay), render(KEDA_OVERLAYS[overlay])
    assert {o["kind"] for o in objects} == EXPECTED_KINDS - {"HorizontalPodAutoscaler"} | {"ScaledObject"}
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    assert [o for o in objects if o["kind"] != "ScaledObject"] == \
        [o for o in plain if o["kind"] != "HorizontalPodAutoscaler"]

    scaled, hpa = one(objects, "ScaledObject"), one(plain, "HorizontalPodAutoscaler")
    deployment = server(objects)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                         "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] != hpa["metadata"]["name"]

    targets = {m["pods"]["metric"]["name"]: quantity(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert sorted(triggers) == sorted(targets)
    namespace = deployment["metadata"]["namespace"]
    for name, trigger in triggers.items():
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        metadata = trigger["metadata"]
        assert set(metadata) == {"serverAddress", "query", "threshold"}
        assert re.fullmatch(r"https?://[^/\s]+", metadata["serverAddress"])
        assert float(metadata["threshold"]) == pytest.approx(targets[name])
        namespaces = re.findall(r'namespace="([^"]*)"', metadata["query"])
        assert namespaces and set(namespaces) == {namespace}, metadata["query"]


def _promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (apt-get install prometheus; .ci/run does it)"
    return binary


def test_scrape_config_passes_promtool(tmp_path):
    """`promtool check config` on monitoring/prometheus-scrape.yaml. Debian's Prometheus (the one CI installs)
    is built without Kubernetes discovery and rejects `kubernetes_sd_configs` as an unknown field; there,
    the same file is checked with the discovery block swapped for a static target, relabeling untouched."""
    checked = subprocess.run([_promtool(), "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True,
                             timeout=30)
    if checked.returncode != 0 and "field kubernetes_sd_configs not found" in checked.stdout + checked.stderr:
        swapped = tmp_path / "prometheus-scrape.yaml"
        swapped.write_text(yaml.safe_dump(loopback_scrape_config(
            [{"address": "127.0.0.1:8000", "namespace": "normfuse", "name": "p"}], interval="15s")))
        checked = subprocess.run([_promtool(), "check", "config", str(swapped)], capture_output=True, text=True,
                                 timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    (job_config,) = scrape_config()["scrape_configs"]
    assert job_config["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = job_config["relabel_configs"]
    targets = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    # it keeps the pods the Deployment annotates, reading the annotations the Deployment sets
    annotations = server(render("cpu"))["spec"]["template"]["metadata"]["annotations"]
    keep = next(r for r in relabel if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert re.fullmatch(keep["regex"], annotations["prometheus.io/scrape"])


# -- the HPA's PromQL, live -----------------------------------------------------------------------
PODS = ["normfuse-server-5d8f7c9b4-abcde", "normfuse-server-5d8f7c9b4-fghij"]
LIVE_DEADLINE_S = 40.0


def _serve_as_the_deployment_does(objects, repo: Path, port: int, scratch: Path) -> tuple[list[str], dict]:
    """The server container's command and environment from the rendered cpu overlay, with only the repository
    path, the bind address and the port changed, and the pod's /tmp emptyDir as a scratch directory."""
    serve = container(server(objects), "server")
    env = {k: v.replace("/tmp", str(scratch)) for k, v in container_env(objects, serve).items()}
    argv = expand(serve["command"], env)
    swaps = {"--repo": str(repo), "--host": "127.0.0.1", "--port": str(port)}
    argv = [swaps.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]
    assert argv[:2] == ["normfuse", "serve"]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("NORMFUSE_")}
    return [sys.executable, "-m", "normfuse.cli", *argv[1:]], {**inherited, **env}


def _pods(objects, namespace: str, port: int) -> list[dict]:
    """What Kubernetes discovery would report: the two server pods (annotated and labelled as the
    Deployment's template says, the port annotation pointing at the test's port), a pod of another app
    without the scrape annotation, and a server pod still Pending. Only the first two must be scraped."""
    template = server(objects)["spec"]["template"]["metadata"]
    annotations = {**template["annotations"], "prometheus.io/port": str(port)}
    base = {"namespace": namespace, "address": "127.0.0.1:8000", "labels": template["labels"]}
    return [*({**base, "name": name, "annotations": annotations} for name in PODS),
            {**base, "name": "unrelated-0", "annotations": {}, "labels": {"app": "other"}},
            {**base, "name": "normfuse-server-pending", "annotations": annotations, "phase": "Pending"}]


class Load:
    """Client threads sending valid requests back to back (so requests queue) until stopped."""

    def __init__(self, url: str, model: str, threads: int = 4) -> None:
        self.url, self.model, self.ok = url, model, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 8}]}
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    if client.post(f"{self.url}/v2/models/{self.model}/infer", json=body).status_code == 200:
                        self.ok += 1


def _per_pod(prometheus: str, queries: dict[str, str]) -> dict[str, dict[str, float]]:
    """metric -> {pod: value} for the finite samples each query returns."""
    found = {}
    for metric, query in queries.items():
        result = instant_query(prometheus, query)
        found[metric] = {s["metric"].get("pod", "?"): float(s["value"][1]) for s in result
                         if math.isfinite(float(s["value"][1]))}
    return found


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_hpa_queries_return_a_value_per_pod_from_a_real_prometheus(tmp_path):
    """prometheus-adapter's metricsQuery for each HPA metric, filled in as the adapter fills it for the HPA's
    pods, evaluated by a real Prometheus that runs monitoring/prometheus-scrape.yaml's relabeling (discovery
    replaced by static targets carrying the same __meta_kubernetes_* labels) against a real `normfuse serve`
    started with the Deployment's command and environment, under load. Both "pods" are the same process."""
    objects = render("cpu")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    repo = repo_builder.build_test_repo(tmp_path / "repo", broken=False)
    (tmp_path / "pod-tmp").mkdir()
    server_port, prom_port = free_port(), free_port()
    command, env = _serve_as_the_deployment_does(objects, repo, server_port, tmp_path / "pod-tmp")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(loopback_scrape_config(_pods(objects, namespace, server_port))))
    rules = {rule["name"]["as"]: rule for rule in adapter_rules()}
    queries = {name: render_metrics_query(rule, namespace, PODS) for name, rule in rules.items()}
    series_of = {name: f'{rule["seriesQuery"]}' for name, rule in rules.items()}

    with (running(command, ready_url=f"http://127.0.0.1:{server_port}/v2/health/ready",
                  log_path=tmp_path / "server.log", env=env, grace_s=40),
          running_prometheus(config, tmp_path, prom_port) as prometheus,
          Load(f"http://127.0.0.1:{server_port}", repo_builder.MODEL) as load):
        deadline = time.monotonic() + LIVE_DEADLINE_S
        values = _per_pod(prometheus, queries)
        while not all(sorted(v) == PODS for v in values.values()) and time.monotonic() < deadline:
            time.sleep(1)
            values = _per_pod(prometheus, queries)
        assert all(sorted(v) == PODS for v in values.values()), \
            f"not one finite value per pod after {LIVE_DEADLINE_S:.0f} s ({load.ok} requests ok): " + \
            "; ".join(f"{name}: {queries[name]} -> {values[name]}" for name in queries)

        # the relabeling scraped exactly the annotated, running pods, labelled as the adapter needs
        up = instant_query(prometheus, 'up{job="kubernetes-pods"}')
        assert sorted(s["metric"]["pod"] for s in up) == PODS
        assert all(s["metric"]["namespace"] == namespace and s["value"][1] == "1" for s in up)
        assert all(s["metric"]["component"] == "server" for s in up)
        # each rule's seriesQuery finds the series it names, on both pods (what the adapter lists)
        for name, series_query in series_of.items():
            found = httpx.get(f"{prometheus}/api/v1/series", params={"match[]": series_query}, timeout=5).json()
            assert {s["pod"] for s in found["data"]} == set(PODS), name
        # plausible values: a depth is a request count (often 0 at a scrape instant below saturation); under
        # load the p95 queue time comes from the histogram, not the idle fallback (0): every first request of
        # a batch waits out the batching window, so it is > 0; on loopback with this light load, well under 1 s
        assert all(v >= 0 for v in values["normfuse_queue_depth_avg1m"].values())
        assert all(0 < v < 1 for v in values["normfuse_queue_time_p95_seconds"].values())
        # KEDA's queries (overlays/cpu-keda) are the sums of the adapter's per-pod values: evaluated at one
        # instant, KEDA's value / replicas is exactly the average the HPA compares with the same target
        at = time.time()
        keda = {t["name"]: t["metadata"]["query"] for t in one(render("cpu-keda"), "ScaledObject")["spec"]["triggers"]}
        for name, query in queries.items():
            per_pod = [float(s["value"][1]) for s in instant_query(prometheus, query, at)]
            (total,) = instant_query(prometheus, keda[name], at)
            assert len(per_pod) == len(PODS) and float(total["value"][1]) == pytest.approx(sum(per_pod)), name
        # the control: a pod the HPA does not own gets nothing
        for rule in rules.values():
            assert instant_query(prometheus, render_metrics_query(rule, namespace, ["normfuse-server-gone"])) == []
    assert load.ok > 0
