"""Start a server under test as a child process on loopback, wait until it is ready, stop it afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadgen import wait_ready

log = logging.getLogger(__name__)

PEERS = {"plain": "benchmarks.peers.plain", "litserve": "benchmarks.peers.litserve_peer",
         "triton": "benchmarks.peers.triton_peer"}
# Triton's server readiness turns true before the bound model has loaded: ask the model instead
READY_PATH = {"plain": "/v2/health/ready", "litserve": "/health", "triton": "/v2/models/{model}/ready",
              "normfuse": "/v2/health/ready"}


def free_port(span: int = 1) -> int:
    """A loopback port P with P..P+span-1 free right now (Triton needs three: HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535 and all(_is_free(port + i) for i in range(1, span)):
            return port
    raise RuntimeError("no free loopback port range found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    kind: str
    base_url: str
    process: subprocess.Popen
    log_path: Path
    ready_path: str
    grpc_address: str | None = None  # host:port of OIP v2 over gRPC (normfuse, triton), None where none


def _command(kind: str, port: int, *, onnx: str | None, model: str | None, repo: str | None,
             threads: int | None, max_batch_size: int, max_queue_delay_ms: float) -> list[str]:
    if kind == "normfuse":
        return [sys.executable, "-m", "normfuse.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                "--port", str(port), "--grpc-port", str(port + 1)]
    cmd = [sys.executable, "-m", PEERS[kind], "--onnx", str(onnx), "--model", str(model), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-queue-delay-ms", str(max_queue_delay_ms)]
    return cmd + (["--threads", str(threads)] if threads else [])


@contextlib.contextmanager
def start(kind: str, *, log_dir: Path, onnx: str | None = None, model: str | None = None, repo: str | None = None,
          threads: int | None = None, max_batch_size: int | None = 16, max_queue_delay_ms: float | None = 0.0,
          env: dict[str, str] | None = None, ready_timeout: float = 180.0) -> Iterator[Server]:
    """Run server `kind` ("normfuse", "plain", "litserve", "triton") until the block exits. For normfuse, None
    leaves a setting at `normfuse serve`'s default (the peers need numbers)."""
    if kind not in READY_PATH:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {', '.join(READY_PATH)}")
    child_env = {**os.environ, **(env or {})}
    if kind == "normfuse":
        chosen = {"NORMFUSE_MAX_BATCH_SIZE": max_batch_size, "NORMFUSE_MAX_QUEUE_DELAY_MS": max_queue_delay_ms}
        child_env.update({k: str(v) for k, v in chosen.items() if v is not None})
        if threads:
            child_env["NORMFUSE_INTRA_OP_THREADS"] = str(threads)
    if kind == "triton":  # the Python backend stub must load this interpreter's libpython
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        child_env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, child_env.get("LD_LIBRARY_PATH")) if p)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = _launch(kind, lambda port: _command(kind, port, onnx=onnx, model=model, repo=repo, threads=threads,
                                                 max_batch_size=max_batch_size,
                                                 max_queue_delay_ms=max_queue_delay_ms),
                     child_env, log_dir, READY_PATH[kind].format(model=model), ready_timeout)
    try:
        log.info("%s ready at %s (pid %d)", kind, server.base_url, server.process.pid)
        yield server
    finally:
        stop(server)


PORT_TAKEN = ("cannot listen on", "address already in use")  # normfuse's gRPC start, uvicorn's bind (errno 98)


def _launch(kind: str, command, env: dict, log_dir: Path, ready_path: str, ready_timeout: float,
            tries: int = 3) -> Server:
    """`command(port)` started on free ports and waited for until ready; started again on other ports if one was
    taken between choosing and binding it (by another process, or a client's ephemeral port)."""
    for attempt in range(1, tries + 1):
        port = free_port({"triton": 3, "normfuse": 2}.get(kind, 1))  # HTTP, then gRPC (and Triton's metrics)
        log_path = log_dir / f"{kind}-{port}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command(port), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        server = Server(kind, f"http://127.0.0.1:{port}", process, log_path, ready_path,
                        f"127.0.0.1:{port + 1}" if kind in ("normfuse", "triton") else None)
        try:
            asyncio.run(_wait(server, ready_timeout))
            return server
        except BaseException as exc:
            stop(server)
            if attempt == tries or not any(text in str(exc).lower() for text in PORT_TAKEN):
                raise
            log.warning("%s: a port of %d..%d was taken before the server bound it; trying other ports", kind,
                        port, port + 2)
    raise AssertionError("unreachable")


async def _wait(server: Server, timeout: float) -> None:
    waiter = asyncio.create_task(wait_ready(server.base_url, timeout, server.ready_path))
    while not waiter.done():
        if server.process.poll() is not None:
            waiter.cancel()
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.kind} exited with {server.process.returncode} before ready:\n{tail}")
        await asyncio.sleep(0.2)
    await waiter


def stop(server: Server, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (the peers start children), then SIGKILL after `grace` s."""
    if server.process.poll() is not None:
        return
    pgid = os.getpgid(server.process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        server.process.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(pgid, signal.SIGKILL)
