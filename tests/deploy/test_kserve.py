"""deploy/kserve checked without a cluster: shape, KServe's conventions, and the real server behind them.

1. Shape. Every key of every manifest is checked, recursively, against KServe's published API: the model classes
   of the `kserve` PyPI package (generated from KServe's OpenAPI spec), read from their source with `ast` so the
   SDK's server dependencies are not needed (`pip install --no-deps kserve`). An unknown field or a wrong type
   anywhere fails. The Kubernetes parts KServe embeds (ObjectMeta, PodSpec fields, Container, Probe, ...) are
   validated against Kubernetes' own strict JSON schemas, bundled with `kubernetes-validate`.
2. Conventions KServe relies on for a custom predictor (container name, PROTOCOL, STORAGE_URI, port), the
   security and probe settings, and what the canary's two revisions claim (docs/kserve.md cites the sources).
3. Behaviour (e2e): `normfuse serve` started with exactly the container's command, args and env (only the model
   repository path, bind address and port substituted), answering over HTTP with the variant the manifest says;
   the canary's two revisions side by side under a real Prometheus with the project's rules (fleet comparison).
4. The container's security settings, enacted (e2e): uid 10001, every filesystem read-only but a tmpfs TMPDIR.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.promkit import finite_values, instant_query, render_test_config, running_prometheus
from tests.process import ROOT, free_port, running

KSERVE_DIR = ROOT / "deploy/kserve"
MAIN = KSERVE_DIR / "inferenceservice.yaml"
CANARY = [KSERVE_DIR / "canary/01-unfused-default.yaml", KSERVE_DIR / "canary/02-fused-canary.yaml"]
KINDS = {  # (apiVersion, kind) -> the kserve SDK model class describing it
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}
PREDICTOR = "kserve-container"  # KServe's InferenceServiceContainerName
MODEL_DIR = "/mnt/models"  # KServe's DefaultModelLocalMountPath
UNFUSED = "unfused"

needs_kserve = pytest.mark.skipif(importlib.util.find_spec("kserve") is None,
                                  reason="the kserve SDK's API models are needed: pip install --no-deps kserve==0.21.0")


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KSERVE_DIR.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def services() -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in documents() if doc["kind"] == "InferenceService"]


def load(path: Path) -> dict:
    [doc] = [d for p, d in services() if p == path]
    return doc


def predictor_container(isvc: dict) -> dict:
    [container] = [c for c in isvc["spec"]["predictor"]["containers"] if c["name"] == PREDICTOR]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@dataclass(frozen=True)
class Predictor:
    """What one InferenceService runs, in either form: a custom container, or predictor.model on a ServingRuntime."""

    isvc: dict
    container: dict  # the kserve-container as KServe would run it (runtime container + the model's env)
    pod: dict  # where the pod-level fields (volumes) are: the predictor, or the runtime's spec
    annotations: dict[str, str]  # the runtime's and the service's, as KServe unions them onto the pod
    storage_uri: str
    protocol: str


MODEL_SPEC_KEYS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "env"}  # what our models may set


def predictor_of(isvc: dict) -> Predictor:
    predictor, annotations = isvc["spec"]["predictor"], dict(isvc["metadata"].get("annotations", {}))
    if "model" not in predictor:  # custom predictor: STORAGE_URI and PROTOCOL are the container's env
        container = predictor_container(isvc)
        env = env_of(container)
        return Predictor(isvc, container, predictor, annotations, env["STORAGE_URI"], env["PROTOCOL"])
    model = predictor["model"]
    assert set(model) <= MODEL_SPEC_KEYS, f"only these model fields are merged here: {MODEL_SPEC_KEYS}"
    [runtime] = [d for _, d in documents() if d["kind"] == "ServingRuntime" and d["metadata"]["name"] == model["runtime"]]
    wanted = model["modelFormat"]
    assert any(f["name"] == wanted["name"] and f.get("version") == wanted.get("version")
               for f in runtime["spec"]["supportedModelFormats"]), "the runtime does not support this model format"
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    [container] = copy.deepcopy([c for c in runtime["spec"]["containers"] if c["name"] == PREDICTOR])
    # KServe merges the model's container fields into the runtime's container; env entries by name
    merged = {**env_of(container), **env_of(model)}
    container["env"] = [{"name": k, "value": v} for k, v in merged.items()]
    annotations = {**runtime["spec"].get("annotations", {}), **annotations}  # the runtime's pod annotations
    return Predictor(isvc, container, runtime["spec"], annotations, model["storageUri"], model["protocolVersion"])


def default_of(path: Path) -> str:
    return env_of(predictor_of(load(path)).container)["NORMFUSE_DEFAULT_VARIANT"]


SERVICE_PATHS = [p for p, _ in services()]


def path_id(path: Path) -> str:
    return str(path.relative_to(KSERVE_DIR))


# -- 1. shape: KServe's API models + Kubernetes' schemas ---------------------------------------------------------
@dataclass(frozen=True)
class ApiModel:
    fields: dict[str, str]  # JSON key -> OpenAPI-generator type, e.g. "list[V1Container]", "dict(str, str)"
    required: frozenset[str]


@functools.cache
def kserve_models() -> dict[str, ApiModel]:
    """Class name -> ApiModel, from kserve/models/*.py without importing kserve (its server needs grpc, pandas...)."""
    spec = importlib.util.find_spec("kserve")  # locates the package, runs nothing
    models = {}
    for path in sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            attrs = {t.id: ast.literal_eval(s.value) for s in node.body if isinstance(s, ast.Assign)
                     for t in s.targets if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map")}
            if "openapi_types" not in attrs:
                continue
            keys = attrs["attribute_map"]
            # the generated setters refuse None for required fields: "Invalid value for `spec`, must not be `None`"
            required = set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", ast.get_source_segment(source, node)))
            models[node.name] = ApiModel({keys[a]: t for a, t in attrs["openapi_types"].items()},
                                         frozenset(keys[a] for a in required))
    return models


@functools.cache
def k8s_schemas() -> tuple[dict, dict[str, str]]:
    """Kubernetes' strict definitions (newest bundled release) and python-client name -> definition name."""
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    version = kubernetes_validate.latest_version()
    defs = json.loads((base / f"v{version}-local-strict/_definitions.json").read_text())
    names: dict[str, list[str]] = {}
    for key in defs["$defs"]:
        parts = key.split(".")  # io.k8s.api.core.v1.Container, io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta
        if re.fullmatch(r"v\d+((alpha|beta)\d+)?", parts[-2]):
            names.setdefault(parts[-2].capitalize() + parts[-1], []).append(key)  # V1Container (kubernetes client)
            if parts[:3] == ["io", "k8s", "api"]:  # K8sIoApiAppsV1DeploymentStrategy (Go package path)
                names.setdefault("K8sIoApi" + parts[3].capitalize() + parts[4].capitalize() + parts[5], []).append(key)
    names["ResourceQuantity"] = ["io.k8s.apimachinery.pkg.api.resource.Quantity"]
    preferred = ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.")
    resolved = {}
    for name, keys in names.items():  # V1Condition exists in several groups; the kserve SDK means core/meta ones
        core = [k for k in keys if k.startswith(preferred)]
        if len(keys) == 1 or len(core) == 1:
            resolved[name] = keys[0] if len(keys) == 1 else core[0]
    return defs, resolved


PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}


def shape_errors(value: object, kind: str, path: str = "") -> list[str]:
    """Every place where `value` does not fit the OpenAPI-generator type `kind`; unknown fields are errors."""
    if value is None:
        return []
    if kind.startswith("list[") and kind.endswith("]"):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [e for i, item in enumerate(value) for e in shape_errors(item, kind[5:-1], f"{path}[{i}]")]
    if kind.startswith("dict(") and kind.endswith(")"):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {value!r}"]
        inner = kind[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in shape_errors(v, inner, f"{path}.{k}")]
    if kind in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[kind]) and not (kind != "bool" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {kind}, got {value!r}"]
    if kind == "object":
        return []
    models = kserve_models()
    if kind in models:
        return _model_errors(value, models[kind], kind, path)
    defs, k8s_names = k8s_schemas()
    if kind in k8s_names:
        return _k8s_errors(value, k8s_names[kind], defs, path)
    return [f"{path}: type {kind} is in neither the kserve SDK nor Kubernetes' schemas, so it cannot be checked"]


def _model_errors(value: object, model: ApiModel, kind: str, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected a {kind} mapping, got {value!r}"]
    errors = [f"{path}.{key}: unknown field for {kind} (known: {sorted(model.fields)})"
              for key in value if key not in model.fields]
    errors += [f"{path}.{key}: required by {kind}" for key in model.required if value.get(key) is None]
    return errors + [e for key, item in value.items() if key in model.fields
                     for e in shape_errors(item, model.fields[key], f"{path}.{key}")]


def _k8s_errors(value: object, definition: str, defs: dict, path: str) -> list[str]:
    import jsonschema
    from referencing import Registry, Resource

    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    validator = jsonschema.Draft202012Validator({"$ref": f"{defs['$id']}#/$defs/{definition}"}, registry=registry)
    return [f"{path}{''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in e.absolute_path)}: "
            f"{e.message} ({definition})" for e in validator.iter_errors(value)]


def resource_errors(doc: dict) -> list[str]:
    kind = KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if kind is None:
        return [f"{doc.get('apiVersion')} {doc.get('kind')}: not a KServe kind this test knows"]
    return shape_errors(doc, kind, doc["kind"])


def test_manifests_exist_and_are_kserve_kinds():
    docs = documents()
    assert {p for p, _ in docs} >= {MAIN, *CANARY}
    assert all((d["apiVersion"], d["kind"]) in KINDS for _, d in docs), [d["kind"] for _, d in docs]


@needs_kserve
@pytest.mark.parametrize("path", sorted(KSERVE_DIR.rglob("*.yaml")), ids=path_id)
def test_every_key_fits_kserve_and_kubernetes_schemas(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert resource_errors(doc) == [], f"{path.name}: {doc['metadata']['name']}"


@needs_kserve
@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["predictor"].__setitem__("canaryTraficPercent", 10), "canaryTraficPercent: unknown field"),
    (lambda d: d["spec"]["predictor"].__setitem__("minReplicas", "1"), "minReplicas: expected int"),
    (lambda d: d["spec"].pop("predictor"), "spec.predictor: required"),
    (lambda d: predictor_container(d).__setitem__("imagePullPolicyy", "Always"), "containers[0]: Additional properties"),
    (lambda d: predictor_container(d)["readinessProbe"]["httpGet"].pop("port"), "'port' is a required property"),
    (lambda d: d["metadata"]["annotations"].__setitem__("serving.kserve.io/enable-tag-routing", True),
     "metadata.annotations.serving.kserve.io/enable-tag-routing: True is not of type"),
])
def test_the_shape_check_catches_mistakes(mutate, expected):
    """The check is not vacuous: a misspelt field, a wrong type, a missing required field each fail it."""
    doc = copy.deepcopy(load(MAIN))
    assert resource_errors(doc) == []
    mutate(doc)
    errors = resource_errors(doc)
    assert any(expected in e for e in errors), errors


# -- 2. KServe's custom-predictor conventions, security, probes, and the canary's claims -------------------------
def _settings_fields() -> set[str]:
    from service.settings import Settings

    return set(Settings.model_fields)


@pytest.mark.parametrize("path", SERVICE_PATHS, ids=path_id)
def test_kserve_predictor_conventions(path):
    run = predictor_of(load(path))
    container, args = run.container, run.container["args"]
    assert run.protocol == "v2"  # custom: the PROTOCOL env (CustomSpecProtocolEnvVarKey); runtime: protocolVersion
    assert run.storage_uri.startswith("pvc://normfuse-models")  # deploy/k8s's PVC, put at /mnt/models by KServe
    assert flag(args, "--repo") == MODEL_DIR
    port = int(flag(args, "--port"))
    assert port == 8080 and flag(args, "--host") == "0.0.0.0"
    (exposed,) = container["ports"]  # Knative: one port per revision; its name says the protocol
    if exposed["name"] == "h2c":  # the gRPC form: the gRPC port is exposed, HTTP stays in the pod
        assert exposed["containerPort"] == int(flag(args, "--grpc-port")) != port
        for kind, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            assert f"'http://127.0.0.1:{port}{path}'" in container[kind]["exec"]["command"][-1], kind
    else:
        assert (exposed["name"], exposed["containerPort"]) == ("http1", port)
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert run.annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert run.annotations["prometheus.kserve.io/port"] == str(port)
    assert run.annotations["prometheus.kserve.io/path"] == "/metrics"
    env = env_of(container)
    unknown = [k for k in env if k.startswith("NORMFUSE_") and k[9:].lower() not in _settings_fields()]
    assert unknown == [], "not normfuse serve settings (typos?)"


def test_container_commands_parse_with_the_real_cli():
    from normfuse.cli import build_parser

    parser = build_parser()
    for path in SERVICE_PATHS:
        container = predictor_of(load(path)).container
        assert container["command"][0] == "normfuse", path
        args = parser.parse_args([*container["command"][1:], *container["args"]])
        assert args.command == "serve" and int(args.port) == 8080 and args.repo == MODEL_DIR, path


@pytest.mark.parametrize("path", SERVICE_PATHS, ids=path_id)
def test_non_root_read_only_with_resources(path):
    run = predictor_of(load(path))
    container = run.container
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001  # the image's user
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # the only writable path is an emptyDir on /tmp
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in run.pod["volumes"]}
    assert list(mounts) == ["/tmp"] and "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert env_of(container)["NORMFUSE_INTRA_OP_THREADS"] == str(resources["limits"]["cpu"])


def test_every_service_but_the_canary_baseline_defaults_to_the_fused_variant():
    fused = default_of(MAIN)
    assert fused != UNFUSED and fused in {"affine", "rmsnorm", "crmsnorm", "folded"}
    assert {p: default_of(p) for p in SERVICE_PATHS if p != CANARY[0]} == {p: fused for p in SERVICE_PATHS
                                                                           if p != CANARY[0]}


def test_canary_rolls_out_the_fused_default_and_changes_nothing_else():
    before, after = (load(p) for p in CANARY)
    assert before["metadata"]["name"] == after["metadata"]["name"]  # two revisions of one InferenceService
    for isvc in (before, after):  # canary traffic splitting needs KServe's Knative mode
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert "canaryTrafficPercent" not in before["spec"]["predictor"]
    assert 0 < after["spec"]["predictor"]["canaryTrafficPercent"] < 100
    assert default_of(CANARY[0]) == UNFUSED
    assert default_of(CANARY[1]) == default_of(MAIN)
    # the revisions differ only in the default variant (and the split), so the fleet compares variants alone
    same_before, same_after = copy.deepcopy(before), copy.deepcopy(after)
    same_after["spec"]["predictor"].pop("canaryTrafficPercent")
    for isvc in (same_before, same_after):
        for item in predictor_container(isvc)["env"]:
            if item["name"] == "NORMFUSE_DEFAULT_VARIANT":
                item["value"] = "?"
    assert same_before == same_after


# -- 3. behaviour: the container's own command line, run for real -----------------------------------------------
def _repo_with(tmp_path: Path, fused: str) -> Path:
    """The test repository (variants unfused, affine; manifest default affine) plus `fused`, a copy of affine.

    The manifest's own default is neither `unfused` nor `fused`, so an answer from either proves that
    NORMFUSE_DEFAULT_VARIANT, not the manifest, chose it.
    """
    from engines.manifest import file_ref, read_manifest, write_manifest
    from tests.service.repo_builder import MODEL, build_test_repo

    repo = build_test_repo(tmp_path / "repo", broken=False)
    model_dir = repo / MODEL
    manifest = read_manifest(model_dir)
    assert manifest.default_variant not in (UNFUSED, fused)
    shutil.copytree(model_dir / "affine", model_dir / fused)
    files = {role: file_ref(model_dir, model_dir / fused / Path(ref.path).name)
             for role, ref in manifest.variants["affine"].files.items()}
    manifest.variants[fused] = manifest.variants["affine"].model_copy(update={"name": fused, "files": files})
    write_manifest(model_dir, manifest)
    return repo


def _command(container: dict, repo: Path, port: int, grpc_port: int = 0) -> list[str]:
    """The container's command + args, with the repository, bind address and ports substituted (nothing else)."""
    argv = [*container["command"], *container["args"]]
    substitutes = {"--repo": str(repo), "--host": "127.0.0.1", "--port": str(port), "--grpc-port": str(grpc_port)}
    argv = [substitutes.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    executable = ROOT / ".venv/bin/normfuse"
    return [str(executable)] + argv[1:] if executable.exists() else [sys.executable, "-m", "normfuse.cli", *argv[1:]]


def _env(container: dict, repo: Path) -> dict[str, str]:
    """Ours (PATH, the venv) plus the container's env; STORAGE_URI as KServe rewrites it: the mounted path."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NORMFUSE_")}, **env_of(container)}
    if "STORAGE_URI" in env:
        env["STORAGE_URI"] = str(repo)
    env.setdefault("NORMFUSE_GRPC_PORT", "0")  # not Triton's fixed 8001 here: a --grpc-port gets a free port
    return {**env, "NORMFUSE_LOG_LEVEL": "warning"}


def _probe_paths(container: dict, port: int) -> dict[str, str]:
    """Readiness and liveness: the path each probes, whether by httpGet or by a command fetching the HTTP port."""
    paths = {}
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]
        if "httpGet" in probe:
            paths[kind] = probe["httpGet"]["path"]
        else:
            paths[kind] = re.search(rf"http://127\.0\.0\.1:{port}(/[\w/]+)", probe["exec"]["command"][-1])[1]
    return paths


def _infer_grpc(address: str, model: str, version: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    import tritonclient.grpc as triton

    x = np.array([[1, 2, 3, 4], [0, -1, 2, 5]], dtype=np.float32)
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], model_version=version or "")
        return result.get_response().model_version, x, result.as_numpy("y")
    finally:
        client.close()


def _infer(url: str, model: str, version: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    import tritonclient.http as triton

    x = np.array([[1, 2, 3, 4], [0, -1, 2, 5]], dtype=np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], model_version=version or "")
        return result.get_response()["model_version"], x, result.as_numpy("y")
    finally:
        client.close()


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", SERVICE_PATHS, ids=path_id)
def test_the_container_serves_the_default_it_claims_and_unfused_as_a_version(path, tmp_path):
    from tests.service.repo_builder import MODEL, expected

    container = predictor_of(load(path)).container
    claimed, fused = default_of(path), default_of(MAIN)
    repo = _repo_with(tmp_path, fused)
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    probes = _probe_paths(container, int(flag(container["args"], "--port")))
    (exposed,) = container["ports"]
    # the exposed port's protocol: HTTP/1.1 (http1) or gRPC (h2c)
    infer = functools.partial(_infer_grpc, f"127.0.0.1:{grpc_port}") if exposed["name"] == "h2c" else \
        functools.partial(_infer, url)
    with running(_command(container, repo, port, grpc_port), ready_url=url + probes["readinessProbe"],
                 log_path=tmp_path / "server.log", env=_env(container, repo)):
        for probe in probes.values():
            assert httpx.get(url + probe, timeout=5).status_code == 200, probe
        for version, answered_by in ((None, claimed), (UNFUSED, UNFUSED), (fused, fused)):
            served, x, y = infer(MODEL, version)
            assert served == answered_by, f"version {version!r}"
            np.testing.assert_array_equal(y, expected(x))
        assert f'variant="{claimed}"' in httpx.get(url + "/metrics", timeout=5).text


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)")
def test_the_canary_revisions_compare_at_fleet_level(tmp_path):
    """Both canary revisions side by side, scraped by a real Prometheus with the project's config and rules:
    each revision reports its own default variant, and the fleet-wide fused/unfused ratio has data."""
    from tests.service.repo_builder import MODEL

    fused = default_of(CANARY[1])
    repo = _repo_with(tmp_path, fused)
    revisions = {name: (predictor_of(load(path)).container, free_port())
                 for name, path in (("prev", CANARY[0]), ("latest", CANARY[1]))}
    prom_port = free_port()
    config = render_test_config(tmp_path / "prometheus.yml", target="unused:1", self_target=f"127.0.0.1:{prom_port}")
    rendered = yaml.safe_load(config.read_text())
    [job] = [j for j in rendered["scrape_configs"] if j["job_name"] == "normfuse"]
    # one target per revision, labelled as a Knative pod-label relabel would label it (docs/kserve.md)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"revision": name}}
                             for name, (_, port) in revisions.items()]
    config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    ratio_query = f'normfuse:request_duration_seconds:p50_ratio_to_unfused_1m{{model="{MODEL}"}}'
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, (container, port) in revisions.items():
            urls[name] = f"http://127.0.0.1:{port}"
            stack.enter_context(running(_command(container, repo, port), ready_url=urls[name] + "/v2/health/ready",
                                        log_path=tmp_path / f"{name}.log", env=_env(container, repo)))
        prometheus = stack.enter_context(running_prometheus(config, tmp_path, prom_port))
        client = stack.enter_context(httpx.Client(timeout=10))
        deadline = time.monotonic() + 45
        while True:  # unversioned traffic to both revisions, as the split would send it
            for url in urls.values():
                for _ in range(10):
                    assert client.post(f"{url}/v2/models/{MODEL}/infer", json=body).status_code == 200
            ratio = finite_values(instant_query(prometheus, ratio_query))
            if ratio or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ratio and all(value > 0 for value in ratio), f"no fleet ratio: {instant_query(prometheus, ratio_query)}"
        served = instant_query(prometheus, f'sum by (revision, variant) (normfuse_requests_total{{model="{MODEL}"}})')
        assert sorted((s["metric"]["revision"], s["metric"]["variant"]) for s in served) == \
            [("latest", fused), ("prev", UNFUSED)]
        [series] = instant_query(prometheus, ratio_query)
        assert series["metric"]["variant"] == fused


# -- 4. non-root, read-only root filesystem, /tmp the only writable place ----------------------------------------
SANDBOX = """set -e
umask 022
# What the unprivileged user must reach but cannot enter (the checkout or the Python install below a mode-700
# directory such as /root or a private temp dir): set each such path aside, cover its closed ancestor with an
# empty tmpfs, and bind the path back at the same place, so every path stays the same.
i=0; for pair in $EXPOSE; do i=$((i+1)); mkdir -p "$KEEP/$i"; mount --bind "${pair#*:}" "$KEEP/$i"; done
covered=" "; for pair in $EXPOSE; do hidden="${pair%%:*}"; case "$covered" in *" $hidden "*) continue ;; esac
  mount -t tmpfs -o mode=755 normfuse-path "$hidden"; covered="$covered$hidden "; done
i=0; for pair in $EXPOSE; do i=$((i+1)); mkdir -p "${pair#*:}"; mount --bind "$KEEP/$i" "${pair#*:}"; done
for mp in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;; *) mount -o remount,bind,ro "$mp" ;; esac
done
mount -t tmpfs -o size=64m,mode=1777 normfuse-tmp "$TMPDIR"
exec setpriv --reuid "$RUN_AS" --regid "$RUN_AS" --clear-groups -- "$@"
"""


def _closed_ancestors(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(topmost ancestor others may not enter, path) for each path below one; the sandbox re-exposes those."""
    pairs = []
    for path in paths:
        path = path.resolve()
        for ancestor in [*reversed(path.parents)][1:]:  # below /, from the top down
            if not ancestor.stat().st_mode & 0o001:
                assert not any(c in str(path) for c in " :\t\n"), f"cannot re-expose {path}"
                pairs.append((ancestor, path))
                break
        assert path.stat().st_mode & 0o005 == 0o005, f"{path} itself is closed to other users"
    return pairs


def _sandboxed(argv: list[str], uid: int, work: Path) -> tuple[list[str], dict[str, str]]:
    """`argv` as `uid` in a private mount namespace where every filesystem is remounted read-only and a fresh
    tmpfs at $TMPDIR is the only writable place (the pod: readOnlyRootFilesystem, an emptyDir on /tmp). The
    checkout and the Python installation are made reachable for `uid` (`_closed_ancestors`)."""
    needed = [ROOT, Path(sys.base_prefix), Path(sys.prefix)]
    expose = " ".join(f"{hidden}:{path}" for hidden, path in _closed_ancestors(needed))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", SANDBOX, "sandbox", *argv], {
        "RUN_AS": str(uid), "EXPOSE": expose, "KEEP": str(work / "keep")}


def _sandbox_works(work: Path) -> bool:
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    argv, extra = _sandboxed(["true"], 0, work)
    env = {**os.environ, **extra, "TMPDIR": str(work / "tmp")}
    return subprocess.run(argv, env=env, capture_output=True).returncode == 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_container_runs_non_root_with_a_read_only_root_filesystem():
    from tests.service.repo_builder import MODEL, expected

    run = predictor_of(load(MAIN))
    security = run.container["securityContext"]
    assert security["readOnlyRootFilesystem"] and [m["mountPath"] for m in run.container["volumeMounts"]] == ["/tmp"]
    # a world-traversable work directory (pytest's tmp_path is private to root): the repository, a writable tmp
    work = Path(tempfile.mkdtemp(prefix="normfuse-kserve-"))
    try:
        work.chmod(0o755)
        (work / "tmp").mkdir()
        if not _sandbox_works(work):
            pytest.skip("no private mount namespaces here (unshare --mount needs CAP_SYS_ADMIN)")
        fused = default_of(MAIN)
        repo = _repo_with(work, fused)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv, extra = _sandboxed(_command(run.container, repo, port), security["runAsUser"], work)
        env = {**_env(run.container, repo), **extra, "TMPDIR": str(work / "tmp"), "HOME": str(work)}
        # the sandbox is real: the repository cannot be written, TMPDIR can
        probe = "touch \"$1/probe\" 2>/dev/null && echo writable || echo read-only"
        for where, want in ((repo, "read-only"), (work / "tmp", "writable")):
            sandbox, _ = _sandboxed(["sh", "-c", probe, "probe", str(where)], security["runAsUser"], work)
            answer = subprocess.run(sandbox, env=env, capture_output=True, text=True, check=True).stdout.strip()
            assert answer == want, where
        log = work / "server.log"
        with running(argv, ready_url=url + "/v2/health/ready", log_path=log, env=env) as proc:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert re.search(r"^Uid:\s+10001\s", status, re.M), status  # exec'd all the way down: same pid
            served, x, y = _infer(url, MODEL, None)
            assert served == fused
            np.testing.assert_array_equal(y, expected(x))
        assert "Read-only file system" not in log.read_text(), log.read_text()[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
