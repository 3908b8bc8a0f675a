"""Start a real process on loopback, wait until it answers ready, stop it: the one runner the tests share.

    with running([prometheus, ...], ready_url=f"{url}/-/ready", log_path=tmp / "prometheus.log"):
        ...                                            # started, answering 200; SIGTERM then kill on exit

The process writes stdout and stderr to `log_path`; every failure quotes the end of that log.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def normfuse(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`normfuse ARGS...` as a user runs it (this interpreter's package), output captured as text."""
    return subprocess.run([sys.executable, "-m", "normfuse.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.is_file() else "(no log)"


def start(cmd: Sequence[str], *, ready_url: str, log_path: Path, env: Mapping[str, str] | None = None,
          timeout_s: float = 90.0, cwd: Path = ROOT) -> subprocess.Popen:
    """Popen `cmd` and poll `ready_url` until it answers 200; RuntimeError (with the log) if it exits or times out.

    `env` is the child's whole environment (None: inherit ours).
    """
    with log_path.open("w") as log:  # the child holds its own descriptor
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{cmd[0]} not ready at {ready_url} in {timeout_s:.0f} s:\n{log_tail(log_path)}")
        time.sleep(0.2)
    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready:\n{log_tail(log_path)}")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; returns the exit code (an exited process is left alone)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running(cmd: Sequence[str], *, ready_url: str, log_path: Path, env: Mapping[str, str] | None = None,
            timeout_s: float = 90.0, grace_s: float = 30.0) -> Iterator[subprocess.Popen]:
    """`start`, yield the ready process, `stop` it however the block ends."""
    proc = start(cmd, ready_url=ready_url, log_path=log_path, env=env, timeout_s=timeout_s)
    try:
        yield proc
    finally:
        stop(proc, grace_s)
