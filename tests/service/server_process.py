"""`normfuse serve` as a real subprocess on a free port, for end-to-end tests (also usable by deploy/bench tests).

    srv = Server(repo, "--max-queue-delay-ms", "5", env={"NORMFUSE_SHADOW_RATE": "1"})  # waits until ready
    httpx.get(f"{srv.url}/v2/health/ready"); srv.stop()                               # SIGTERM, wait
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.process import ROOT, free_port, start, stop

__all__ = ["ROOT", "Server", "free_port"]


class Server:
    """`normfuse serve` in a subprocess; waits until `ready_path` answers 200 (tests.process.start)."""

    def __init__(self, repo: Path, *flags: str, env: dict[str, str] | None = None,
                 ready_path: str = "/v2/health/ready") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(ROOT / ".venv/bin/normfuse"), "serve", "--repo", str(repo), "--port", str(self.port), *flags]
        if not Path(cmd[0]).exists():
            cmd[:1] = [sys.executable, "-m", "normfuse.cli"]
        self.log_path = repo.parent / f"server-{self.port}.log"
        self.proc = start(cmd, ready_url=f"{self.url}{ready_path}", log_path=self.log_path,
                          env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait up to 30 s, then SIGKILL; the exit code."""
        return stop(self.proc)


def inflight(url: str) -> float:
    """normfuse_inflight_requests summed over every series: requests accepted and not yet answered."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("normfuse_inflight_requests{"))


def sigterm_with_requests_in_flight(srv: Server, call: Callable[[int], None], n: int) -> list[threading.Thread]:
    """call(0) … call(n-1) on threads; once all n are in flight in the server, SIGTERM it. The threads, running."""
    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while inflight(srv.url) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inflight(srv.url) == n, "the requests never all reached the server"
    srv.proc.send_signal(signal.SIGTERM)
    return threads
