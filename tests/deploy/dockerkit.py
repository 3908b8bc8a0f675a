"""A real Docker engine for the docker tests (`make docker-test`): start one if none answers, make the local
base image, build the CPU image, run the compose stack with the test override, and tear all of it down.

Everything that is started here is stopped here, by PID or by project name, even when a test fails. Nothing is
pulled (no registry is reachable): the base image is Debian bookworm from `debootstrap`, imported once and
cached under that name; containers use the host's network and loopback only (no bridge network is created).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.deploy.promkit import COMPOSE_FILE, ROOT, compose_binary

# Debian bookworm's python3 is 3.11, the same minor as the official python:3.11-slim-bookworm base.
LOCAL_BASE = "normfuse-local/debian-python:bookworm"
CPU_IMAGE = "normfuse:0.1.0-cpu"
TEST_OVERRIDE = ROOT / "deploy" / "compose.test.yml"
DEBIAN_MIRROR = os.environ.get("NORMFUSE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")   # Debian's ca-certificates, trusted by the host's pip
LOCAL_WHEELS = Path(os.environ.get("NORMFUSE_WHEEL_DIR", "/opt/wheels"))  # where this machine's CPU torch lies
IMAGE_LABEL = "org.opencontainers.image.vendor=normfuse"  # on every image built here (Dockerfiles' LABEL)
DOCKERD_ARGS = ["--bridge=none", "--iptables=false", "--ip-masq=false"]


class DockerUnavailable(RuntimeError):
    """No engine answers and none can be started here; the message says why."""


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def engine(log: Path, wait_s: float = 60) -> Iterator[int | None]:
    """Yield the PID of the dockerd started here, or None when an engine already answered (left running)."""
    if engine_answers():
        yield None
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise DockerUnavailable("no Docker engine answers and dockerd is not installed "
                                "(as root: apt-get install -y docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine answers and dockerd needs root to start one")
    with log.open("ab") as out:
        process = subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + wait_s
        while not engine_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise DockerUnavailable(f"dockerd {' '.join(DOCKERD_ARGS)} did not start "
                                        f"(exit {process.poll()}); its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def ensure_local_base(name: str = LOCAL_BASE) -> bool:
    """Debian bookworm (minbase + python3, python3-venv) as a Docker image; made once. True if made now."""
    if image_exists(name):
        return False
    if shutil.which("debootstrap") is None:
        raise DockerUnavailable("debootstrap is not installed (as root: apt-get install -y debootstrap)")
    with tempfile.TemporaryDirectory(prefix="normfuse-rootfs-", dir="/var/tmp") as rootfs:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                        rootfs, DEBIAN_MIRROR], check=True, capture_output=True, timeout=1800)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (Path(rootfs) / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        docker("import", "--change", 'CMD ["python3"]', "-", name, stdin=tar.stdout, timeout=600)
        tar.wait()
    return True


@contextlib.contextmanager
def local_wheels(source: Path = LOCAL_WHEELS, target: Path = ROOT / "deploy" / "wheels") -> Iterator[list[Path]]:
    """Hard-link (or copy) the machine's local wheels into deploy/wheels/ for a build; remove only those."""
    made = []
    try:
        for wheel in sorted(source.glob("*.whl")):
            link = target / wheel.name
            if not link.exists():
                try:
                    os.link(wheel, link)
                except OSError:
                    shutil.copy2(wheel, link)
                made.append(link)
        yield made
    finally:
        for link in made:
            link.unlink(missing_ok=True)


def check_ports_free(ports: dict[str, int]) -> None:
    """Raise, naming the service, when a port the stack would listen on is taken (host networking)."""
    for service, port in ports.items():
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise StackFailed(f"port {port} for `{service}` is already in use on 127.0.0.1 ({exc.strerror}): "
                                  f"stop what holds it or choose another port") from None


class StackFailed(RuntimeError):
    """The compose stack did not come up (or down) as expected; the message names the service and quotes its logs."""


class Stack:
    """One compose project: docker-compose.yml + the test override, its own env file and ports."""

    def __init__(self, workdir: Path, project: str, *, files=(COMPOSE_FILE, TEST_OVERRIDE), **env: str) -> None:
        self.workdir, self.project, self.files, self.settings = workdir, project, tuple(files), env
        self.env_file = workdir / f"{project}.env"
        self.env_file.write_text((ROOT / ".env.example").read_text())
        (workdir / "docker-config").mkdir(exist_ok=True)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
                    "DOCKER_CONFIG": str(workdir / "docker-config"), "TEST_BASE_IMAGE": LOCAL_BASE,
                    "TEST_PIP_CA": str(HOST_CA_BUNDLE), **env}

    def sibling(self, project: str, files=None) -> Stack:
        """Another project with the same settings (its own env file, containers and volumes)."""
        return Stack(self.workdir, project, files=files or self.files, **self.settings)

    def compose(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None,
                log: Path | None = None) -> subprocess.CompletedProcess:
        command = [str(compose_binary()), "--project-name", self.project, "--project-directory", str(ROOT),
                   "--env-file", str(self.env_file)]
        for file in self.files:
            command += ["-f", str(file)]
        result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env={**self.env, **(env or {})})
        if log is not None:
            log.write_text(result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise StackFailed(f"docker compose {' '.join(args)} failed ({result.returncode}):\n"
                              f"{result.stderr[-3000:]}\n{self.diagnose()}")
        return result

    def containers(self) -> list[dict]:
        """`docker compose ps -a` as dicts (Service, State, Health, ExitCode, Name)."""
        import json

        out = self.compose("ps", "-a", "--format", "json", check=False, timeout=60).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]

    def diagnose(self) -> str:
        """Each container's state, and the logs of those that are not running healthy or exited 0."""
        lines = []
        for c in self.containers():
            health, code = c.get("Health") or "", c.get("ExitCode", 0)
            lines.append(f"{c['Service']}: {c['State']} health={health or '-'} exit={code}")
            fine = (c["State"] == "running" and health in ("", "healthy")) or (c["State"] == "exited" and code == 0)
            if not fine:
                logs = docker("logs", "--tail", "60", c["Name"], check=False, timeout=60)
                lines.append(f"--- logs of {c['Service']} ---\n{logs.stdout}{logs.stderr}")
        return "\n".join(lines) or "(no containers)"

    def build(self, *services: str, log: Path) -> None:
        """Build with this machine's wheels linked into the context; the full build log goes to `log`."""
        with local_wheels():
            self.compose("--progress", "plain", "build", *services, timeout=3600, log=log)
        # what a rebuild replaced (ours only, by label): CI builds on one machine again and again
        docker("image", "prune", "--force", "--filter", f"label={IMAGE_LABEL}", timeout=300)

    def up(self, *services: str, wait_s: int = 600, env: dict | None = None, flags=()) -> None:
        """`up -d --wait`: one-shot services must exit 0, the others become healthy; else StackFailed."""
        self.compose("up", "--detach", "--no-build", "--wait", "--wait-timeout", str(wait_s), *flags, *services,
                     timeout=wait_s + 60, env=env)

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service, timeout=60).stdout

    def down(self) -> None:
        """Remove the project's containers and volumes, whatever state they are in; check nothing is left."""
        self.compose("--profile", "loadgen", "--profile", "grafana", "down", "--volumes", "--remove-orphans",
                     "--timeout", "60", timeout=300)
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}").stdout.split()
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}")
        if left or volumes.stdout.split():
            raise StackFailed(f"{self.project}: left after down: containers {left}, volumes {volumes.stdout.split()}")
