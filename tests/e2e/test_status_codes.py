"""Each status code of the inference path, against the real uvicorn server in its own process (the gated fake
engine, y = 2x + 1, blocks while a gate file exists): 400 for a value past the manifest's limit, 499 for a client
gone during its upload (logged at debug, not as an error), 504 for a request's own timeout, 503 + Retry-After
before the body is read once `max_inflight` requests are in, and a hung engine: 503, not ready, then not live,
and a shutdown that does not wait for it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import httpx
import pytest

from engines.manifest import InputConstraint, read_manifest, write_manifest
from tests.process import ROOT, free_port, start, stop
from tests.service.repo_builder import MODEL, build_test_repo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def launch(tmp_path, **env):
    repo = build_test_repo(tmp_path / "repo", broken=False)
    manifest = read_manifest(repo / MODEL)
    manifest.constraints = [InputConstraint(name="x", min_value=-100, max_value=100, source="a test limit")]
    write_manifest(repo / MODEL, manifest)
    gate, port = tmp_path / "gate", free_port()
    settings = {"NORMFUSE_REPO": str(repo), "NORMFUSE_PORT": str(port), "NORMFUSE_MAX_BATCH_SIZE": "1",
                "NORMFUSE_WARMUP_BATCH_SIZES": "1", **{f"NORMFUSE_{k.upper()}": str(v) for k, v in env.items()}}
    log = tmp_path / "server.log"
    proc = start([sys.executable, "-m", "tests.service.gated_server", str(gate)], log_path=log,
                 ready_url=f"http://127.0.0.1:{port}/v2/health/ready", env={**os.environ, **settings,
                                                                             "PYTHONPATH": str(ROOT)})
    return proc, f"http://127.0.0.1:{port}", gate, log


def body(value: float, **parameters) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}],
            **({"parameters": parameters} if parameters else {})}


def raw(port: int, head: bytes, then_close: bool) -> bytes:
    """Send `head` (request line, headers, maybe part of a body) on a fresh connection; read the answer unless
    `then_close` (the client goes away mid-upload)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        if then_close:
            return b""
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def upload(port: int, length: int, sent: bytes = b"") -> bytes:
    return (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + sent


async def until(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_status_codes_of_the_inference_path(tmp_path):
    proc, url, gate, log = launch(tmp_path, max_inflight=3, log_level="debug")
    port = int(url.rsplit(":", 1)[1])

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            bad = await c.post(f"/v2/models/{MODEL}/infer", json=body(1000))
            raw(port, upload(port, 4096, b'{"inputs": ['), then_close=True)  # gone mid-upload
            await until(lambda: _has(c, 'code="499"'))
            gate.touch()  # the engine blocks from now on
            held = asyncio.ensure_future(c.post(f"/v2/models/{MODEL}/infer", json=body(1)))
            await until(lambda: _has(c, "normfuse_inflight_requests{", "1.0"))
            expired = await c.post(f"/v2/models/{MODEL}/infer", json=body(2, timeout=100_000))  # 0.1 s
            queued = [asyncio.ensure_future(c.post(f"/v2/models/{MODEL}/infer", json=body(3 + i))) for i in range(2)]
            await until(lambda: _has(c, "normfuse_queue_depth{", "2.0"))
            # a fourth request: refused from its headers alone, its 50 MB body never sent
            refused = await asyncio.to_thread(raw, port, upload(port, 50_000_000), False)
            gate.unlink()
            answered = await asyncio.gather(held, *queued)
            metrics = (await c.get("/metrics")).text
        return bad, expired, refused, answered, metrics

    try:
        bad, expired, refused, answered, metrics = asyncio.run(main())
    finally:
        gate.unlink(missing_ok=True)
        stop(proc)
    assert bad.status_code == 400 and all(s in bad.json()["error"] for s in ("'x'", "1000", "100", "a test limit"))
    assert expired.status_code == 504 and "timeout expired" in expired.json()["error"]
    head = refused.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 503") and "retry-after: 1" in head, refused[:300]
    assert b"limit of 3 requests in flight" in refused
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert [r.json()["outputs"][0]["data"][0] for r in answered] == [3.0, 7.0, 9.0]
    assert "normfuse_refused_requests_total 1.0" in metrics
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    assert "client went away" in text  # at debug


async def _has(client: httpx.AsyncClient, *needles: str) -> bool:
    text = (await client.get("/metrics")).text
    return any(all(n in line for n in needles) for line in text.splitlines())


def test_a_hung_engine_turns_not_ready_then_not_live_and_shutdown_does_not_wait_for_it(tmp_path):
    proc, url, gate, log = launch(tmp_path, engine_timeout_s=0.5, engine_recovery_s=1, drain_timeout_s=2)
    try:
        gate.touch()
        with httpx.Client(base_url=url, timeout=30) as c:
            stuck = c.post(f"/v2/models/{MODEL}/infer", json=body(1))
            ready = c.get(f"/v2/models/{MODEL}/ready")
            lives = [c.get("/v2/health/live")]
            while lives[-1].status_code == 200 and len(lives) < 300:
                time.sleep(0.1)
                lives.append(c.get("/v2/health/live"))
        code = stop(proc, grace_s=30)  # SIGTERM; SIGKILL only if it has not exited after 30 s
    finally:
        gate.unlink(missing_ok=True)
        stop(proc)
    assert stuck.status_code == 503 and "engine_timeout_s=0.5" in stuck.json()["error"]
    assert stuck.headers["retry-after"] == "1"
    assert ready.status_code == 503 and "engine not responding" in ready.json()["error"]
    assert lives[0].status_code == 200 or "restart" in lives[0].text
    assert lives[-1].status_code == 503 and "restart the server" in lives[-1].json()["error"]
    # exited by itself (uvicorn re-raises the SIGTERM it handled) although the engine thread still blocks;
    # -9 would mean stop() had to kill it after 30 s
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "not closing it" in log.read_text()
