"""deploy/k8s/components/amx-nodes: the cpu overlay plus the component, rendered by the real `kubectl kustomize` and
validated against Kubernetes' own schemas (strict), like the overlays in test_k8s.py; the component must only
add the same AMX node requirement to the convert Job and the server pods, and the label must be the one
node-feature-discovery publishes for the flag engines/cpu.py reads."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.deploy.k8skit import one, pod_spec, render, render_with_components

KUBERNETES_VERSIONS = ("1.30", "1.33")  # as test_k8s.py
NFD_AMX_BF16 = "feature.node.kubernetes.io/cpu-cpuid.AMXBF16"  # NFD's cpuid feature for /proc/cpuinfo's amx_bf16
WORKLOADS = (("Job", "normfuse-convert"), ("Deployment", "normfuse-server"))


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    return render_with_components("cpu", ["amx-nodes"], tmp_path_factory.mktemp("amx"))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(objects, version):
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version}: {exc}")


def test_the_job_and_the_servers_require_the_same_amx_nodes(objects):
    required = []
    for kind, name in WORKLOADS:
        affinity = pod_spec(one(objects, kind, name))["affinity"]["nodeAffinity"]
        required.append(affinity["requiredDuringSchedulingIgnoredDuringExecution"])
    assert required[0] == required[1]  # the plans are timed on the kind of CPU that serves them
    (term,) = required[0]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": NFD_AMX_BF16, "operator": "In", "values": ["true"]}]


def test_nothing_else_changes(objects):
    plain = render("cpu")
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in plain)
    for obj in objects:
        if (obj["kind"], obj["metadata"]["name"]) in WORKLOADS:
            del pod_spec(obj)["affinity"]
        assert obj in plain, f"{obj['kind']} {obj['metadata']['name']} changed beyond its node affinity"


def test_a_node_with_the_label_runs_bf16_plans_natively():
    """NFD sets AMXBF16 from the CPUID bit Linux lists as amx_bf16; engines/cpu.py reads that flag, and a CPU
    with it runs bf16 plans natively (a recorded Sapphire Rapids /proc/cpuinfo)."""
    from pathlib import Path

    from engines.cpu import FLAGS, detect

    assert NFD_AMX_BF16.rsplit(".", 1)[1] == "AMXBF16" and "amx_bf16" in FLAGS
    cpu = detect(Path(__file__).parents[1] / "engines" / "cpuinfo" / "xeon-sapphire-rapids-amx.txt", {})
    assert "amx_bf16" in cpu.flags and cpu.can_run_natively("bf16")[0]
