"""Helpers for the deploy/k8s tests: render the overlays with the real kubectl, find objects in the result,
expand Kubernetes' $(VAR) references, render prometheus-adapter rules, and turn the pod-annotation scrape job
into one a Prometheus on loopback can run.

Nothing is faked: rendering is `kubectl kustomize` (kustomize v5, bundled in kubectl), validation is
kubernetes-validate's bundled OpenAPI schemas, and the PromQL runs in a real Prometheus.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KEDA_OVERLAYS = {"cpu-keda": "cpu", "gpu-keda": "gpu"}  # overlay with KEDA -> the overlay it wraps
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"  # Helm: the same rules under rules.custom
SCRAPE_CONFIG = K8S / "monitoring" / "prometheus-scrape.yaml"
COMPONENTS = K8S / "components"


def kubectl() -> str:
    binary = shutil.which("kubectl")
    assert binary, ("kubectl is not installed: the deploy/k8s checks render the manifests with `kubectl kustomize` "
                    "(kubectl >= 1.27, kustomize v5); install it from the Kubernetes apt repository (pkgs.k8s.io; Debian's kubernetes-client is 1.20, too old) and re-run")
    return binary


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, parsed; AssertionError with kustomize's message if it fails."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> tuple[str, ...]:
    return tuple(yaml.safe_dump(doc) for doc in kustomize(K8S / "overlays" / overlay))


def render(overlay: str) -> list[dict]:
    """The overlay's objects (a fresh copy each call: tests may change what they get)."""
    return [yaml.safe_load(doc) for doc in _rendered(overlay)]


def render_with_components(overlay: str, components: list[str], workdir: Path) -> list[dict]:
    """The overlay plus components, as a user adds them: a kustomization (in `workdir`) naming both, in the
    overlay's namespace (as when the component is listed in the overlay's own kustomization.yaml)."""
    overlay_dir = K8S / "overlays" / overlay
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())["namespace"],
        # relative: kustomize refuses absolute paths to other kustomizations
        "resources": [os.path.relpath(overlay_dir, workdir)],
        "components": [os.path.relpath(COMPONENTS / name, workdir) for name in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(workdir)


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    spec = pod_spec(workload)
    found = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no single container {name!r}"
    return found[0]


def config_map(objects: list[dict], name: str) -> dict[str, str]:
    """The data of the ConfigMap generated as `name` (kustomize appends a content hash to the name)."""
    found = [o for o in find(objects, "ConfigMap") if re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", o["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap {name}-<hash>, found {[o['metadata']['name'] for o in found]}"
    return found[0]["data"]


def secret_value(name: str, key: str) -> str:
    """What container_env puts for a value taken from Secret `name`'s `key` (Secrets are never rendered)."""
    return f"secret.{name}.{key}"


def container_env(objects: list[dict], spec: dict) -> dict[str, str]:
    """The environment a container starts with: its envFrom ConfigMaps, then its env values in order, literal
    ($(VAR) of an earlier one expanded, as Kubernetes does) or from a Secret (`secret_value`)."""
    env: dict[str, str] = {}
    by_name = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "ConfigMap")}
    for source in spec.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in by_name, f"container {spec['name']}: envFrom names ConfigMap {ref}, which is not rendered"
        env.update(by_name[ref])
    for item in spec.get("env", []):
        secret = item.get("valueFrom", {}).get("secretKeyRef")
        if secret is not None:
            env[item["name"]] = secret_value(secret["name"], secret["key"])
            continue
        assert "value" in item, f"container {spec['name']}: env {item['name']} is neither a value nor a Secret's"
        env[item["name"]] = expand([item["value"]], env)[0]
    return env


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command/args; a reference to an undefined variable fails the test
    (Kubernetes would pass it through literally, which is never what a manifest means)."""

    def one_arg(arg: str) -> str:
        def sub(match: re.Match) -> str:
            name = match.group(1)
            assert name in env, f"$({name}) in {argv} is not defined in the container's environment"
            return env[name]

        return re.sub(r"\$\((\w+)\)", sub, arg)

    return [one_arg(arg) for arg in argv]


def normfuse_parser():
    """The real `normfuse` argument parser and its subcommand names."""
    from normfuse.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return parser, commands


# -- prometheus-adapter ---------------------------------------------------------------------------
def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def series_name(rule: dict) -> str:
    """The metric name a rule's seriesQuery selects (`name{...}`)."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"].strip())
    assert match, f"seriesQuery {rule['seriesQuery']!r} is not metric{{labels}}"
    return match.group(1)


def render_metrics_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter runs for `kubectl get --raw .../namespaces/NS/pods/*/METRIC`: its Go
    templates filled the way the adapter fills them for a pod-level query."""
    overrides = rule["resources"]["overrides"]
    label_of = {value["resource"]: label for label, value in overrides.items()}
    matchers = f'{label_of["namespace"]}="{namespace}",{label_of["pod"]}=~"{"|".join(pods)}"'
    query = rule["metricsQuery"]
    for template, value in (("<<.Series>>", series_name(rule)), ("<<.LabelMatchers>>", matchers),
                            ("<<.GroupBy>>", label_of["pod"])):
        query = query.replace(template, value)
    leftover = re.findall(r"<<[^>]*>>", query)
    assert not leftover, f"template(s) {leftover} left in {query!r}"
    return query


# -- the pod-annotation scrape job, on loopback ---------------------------------------------------
def scrape_config() -> dict:
    return yaml.safe_load(SCRAPE_CONFIG.read_text())


def static_pod_targets(pods: list[dict]) -> list[dict]:
    """static_configs standing in for kubernetes_sd_configs (role: pod): one target per pod, carrying the
    __meta_kubernetes_* labels Kubernetes discovery would give it (each pod: address, namespace, name,
    phase, annotations, labels), so the job's own relabel_configs run unchanged."""
    targets = []
    for pod in pods:
        labels = {"__meta_kubernetes_namespace": pod["namespace"], "__meta_kubernetes_pod_name": pod["name"],
                  "__meta_kubernetes_pod_phase": pod.get("phase", "Running")}
        for key, value in pod.get("annotations", {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_meta(key)}"] = value
        for key, value in pod.get("labels", {}).items():
            labels[f"__meta_kubernetes_pod_label_{_meta(key)}"] = value
        targets.append({"targets": [pod["address"]], "labels": labels})
    return targets


def _meta(key: str) -> str:
    """Prometheus' sanitising of annotation and label names in meta labels: every invalid character -> _."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def loopback_scrape_config(pods: list[dict], interval: str = "1s") -> dict:
    """monitoring/prometheus-scrape.yaml with kubernetes_sd_configs replaced by `static_pod_targets(pods)`
    and the intervals shortened; relabel_configs untouched."""
    config = copy.deepcopy(scrape_config())
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    for job in config["scrape_configs"]:
        assert "kubernetes_sd_configs" in job, f"job {job['job_name']} does not discover pods"
        del job["kubernetes_sd_configs"]
        job["static_configs"] = static_pod_targets(pods)
    return config
