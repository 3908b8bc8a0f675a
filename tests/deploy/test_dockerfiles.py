"""deploy/Dockerfile.{cpu,gpu} and .dockerignore, checked structurally (no Docker engine here).

Parsed the way Docker reads them: comment lines dropped, backslash continuations joined.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys

import pytest
import tomllib

from service.settings import Settings
from tests.deploy.promkit import ROOT

GRPC_DEFAULT = Settings.model_fields["grpc_port"].default  # `normfuse serve` serves gRPC here unless told otherwise

DOCKERFILES = {"cpu": ROOT / "deploy" / "Dockerfile.cpu", "gpu": ROOT / "deploy" / "Dockerfile.gpu"}
# the packages the wheel installs (pyproject's packages.find include), each of which an image must copy
SOURCE_PACKAGES = tuple(p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                        ["tool"]["setuptools"]["packages"]["find"]["include"])


def instructions(kind: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order."""
    lines, current = [], ""
    for raw in DOCKERFILES[kind].read_text().splitlines():
        if raw.strip().startswith("#") or (not raw.strip() and not current):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    parsed = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        parsed.append((word.upper(), rest.strip()))
    return parsed


def base_image(kind: str) -> str:
    steps = instructions(kind)
    args = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        if word == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM")


def dockerignore_admits(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also covers everything under a directory."""
    admitted = True
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.replace("**/", "")) for p in prefixes):
            admitted = negate
    return admitted


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_base_image_is_pinned(kind):
    image = base_image(kind)
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image


def test_expected_base_images():
    assert base_image("cpu").startswith("python:3.11.") and "slim" in base_image("cpu")
    assert base_image("gpu").startswith("nvcr.io/nvidia/tensorrt:")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_non_root(kind):
    users = [rest for word, rest in instructions(kind) if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, (word, _) in enumerate(instructions(kind)) if word == "USER")
    assert all(word not in ("RUN", "COPY") for word, _ in instructions(kind)[last_user:]), "root steps after USER"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_healthcheck_probes_readiness_on_the_served_port(kind):
    steps = dict(instructions(kind))
    health = steps["HEALTHCHECK"]
    assert "/v2/health/ready" in health and "--start-period=" in health
    cmd = json.loads(steps["CMD"])
    assert cmd[:2] == ["normfuse", "serve"] and "/models" in cmd
    port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{port}/v2/health/ready" in health
    exposed = [p for word, rest in instructions(kind) if word == "EXPOSE" for p in rest.split()]
    grpc_port = cmd[cmd.index("--grpc-port") + 1] if "--grpc-port" in cmd else str(GRPC_DEFAULT)
    assert exposed == [port, grpc_port]  # OIP v2 over HTTP, then over gRPC
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # reachable from other containers


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dependency_layer_comes_before_the_source(kind):
    steps = instructions(kind)
    copies = [(i, rest.split()) for i, (word, rest) in enumerate(steps) if word == "COPY"]
    first_index, first = copies[0]
    assert first[:-1] == ["pyproject.toml"], "the first COPY brings only the dependency list"
    install = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and "pip install -r" in rest)
    source = min(i for i, args in copies if any(a.rstrip("/") in SOURCE_PACKAGES for a in args[:-1]))
    assert first_index < install < source


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_installed_package_is_copied_into_the_image(kind):
    """A package pyproject installs but the image does not copy fails only at run time (ModuleNotFoundError)."""
    copied = {a.rstrip("/") for word, rest in instructions(kind) if word == "COPY" for a in shlex.split(rest)[:-1]}
    assert set(SOURCE_PACKAGES) <= copied, f"not copied: {sorted(set(SOURCE_PACKAGES) - copied)}"
    assert all(dockerignore_admits(f"{package}/__init__.py") for package in SOURCE_PACKAGES)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_requirements_snippet_yields_pyproject_dependencies(kind):
    """Run the image's own pyproject -> requirements one-liner here and compare with tomllib."""
    run = next(rest for word, rest in instructions(kind) if word == "RUN" and "tomllib" in rest)
    code = re.search(r'python3? -c "(.*?)"\s*>', run).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = pyproject["project"]["dependencies"]
    if kind == "cpu":  # the build backend too: the source step then installs with --no-build-isolation, offline
        wanted = wanted + pyproject["build-system"]["requires"]
        assert any(word == "RUN" and "--no-build-isolation" in rest for word, rest in instructions(kind))
    assert out.splitlines() == wanted


def build_args(kind: str) -> dict[str, str]:
    return dict(rest.partition("=")[::2] for word, rest in instructions(kind) if word == "ARG")


def test_cpu_image_defaults_are_the_public_sources():
    """Real users get the official base and PyTorch's CPU index; `make docker-test` passes local ones."""
    args = build_args("cpu")
    assert args["BASE_IMAGE"].startswith("python:3.11.") and "slim" in args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    run = next(rest for word, rest in instructions("cpu") if word == "RUN" and "torch==" in rest)
    assert '--index-url "$TORCH_INDEX_URL"' in run
    pinned = re.search(r"torch==([\d.]+)", run).group(1)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={pinned}" in deps


def test_cpu_image_mounts_wheels_and_the_ca_bundle_only_for_the_install():
    """deploy/wheels/ and the optional `pip_ca` secret are RUN mounts, never COPY'd into a layer."""
    run = next(rest for word, rest in instructions("cpu") if word == "RUN" and "torch==" in rest)
    assert "--mount=type=secret,id=pip_ca" in run and "--mount=type=bind,source=deploy/wheels" in run
    copied = [a for word, rest in instructions("cpu") if word == "COPY" for a in shlex.split(rest)[:-1]]
    assert not any(a.startswith("deploy") for a in copied)
    assert (ROOT / "deploy" / "wheels").is_dir() and dockerignore_admits("deploy/wheels/torch-2.13.0.whl")


def test_gpu_image_checks_the_tensorrt_major_and_serves_tensorrt():
    steps = instructions("gpu")
    assert any(word == "RUN" and "import tensorrt" in rest and "major == 11" in rest for word, rest in steps)
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "NORMFUSE_BACKEND=tensorrt" in env


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_copied_path_exists_and_passes_dockerignore(kind):
    for word, rest in instructions(kind):
        if word != "COPY":
            continue
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert dockerignore_admits(source.rstrip("/")), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_build_outputs_and_secrets_out():
    for path in (".venv/bin/python", ".git/HEAD", "model_repository/m/manifest.json", ".env", "tests/__init__.py",
                 "service/__pycache__/app.cpython-311.pyc", "engines/x.plan"):
        assert not dockerignore_admits(path), path
    for path in ("pyproject.toml", "README.md", "service/app.py", "convert/cli.py"):
        assert dockerignore_admits(path), path
