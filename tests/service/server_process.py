"""`normfuse serve` as a real subprocess on a free port, for end-to-end tests (also usable by deploy/bench tests).

    srv = Server(repo, "--max-queue-delay-ms", "5", env={"NORMFUSE_SHADOW_RATE": "1"})  # waits until ready
    httpx.get(f"{srv.url}/v2/health/ready"); srv.stop()                               # SIGTERM, wait
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.process import ROOT, free_port, start, stop

__all__ = ["ROOT", "Server", "free_port"]


class Server:
    """`normfuse serve` in a subprocess; waits for /v2/health/ready (tests.process.start)."""

    def __init__(self, repo: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(ROOT / ".venv/bin/normfuse"), "serve", "--repo", str(repo), "--port", str(self.port), *flags]
        if not Path(cmd[0]).exists():
            cmd[:1] = [sys.executable, "-m", "normfuse.cli"]
        self.log_path = repo.parent / f"server-{self.port}.log"
        self.proc = start(cmd, ready_url=f"{self.url}/v2/health/ready", log_path=self.log_path,
                          env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait up to 30 s, then SIGKILL; the exit code."""
        return stop(self.proc)
