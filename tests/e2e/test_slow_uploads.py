"""Slow uploads cannot lock the server out (issue 22), against the real uvicorn server process: 100 raw-socket
connections announce `Content-Length: 1000000` and trickle a byte every 2 s, while normal requests are sent; the
normal ones are answered 200 (a slow body holds no in-flight place) and each trickler is answered 408 with the
connection closed (min_upload_bytes_per_s). Outcomes are asserted, not timings."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.e2e.test_status_codes import body, launch
from tests.process import stop
from tests.service.repo_builder import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
TRICKLERS, NORMAL = 100, 40


def trickle(port: int, answers: list, stop_at: float) -> None:
    """Announce a 1 MB body, send a byte every 2 s until answered (or `stop_at`); record the answer's head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      "Content-Length: 1000000\r\n\r\n{").encode())
        sock.settimeout(2)
        answer = b""
        while time.monotonic() < stop_at:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                continue
            if not chunk:  # the server closed the connection
                answers.append((answer, "closed"))
                return
            answer += chunk
        answers.append((answer, "open"))


def test_trickling_uploads_do_not_stop_normal_requests(tmp_path):
    proc, url, _gate, log = launch(tmp_path, max_inflight=8)
    port = int(url.rsplit(":", 1)[1])
    answers: list = []
    stop_at = time.monotonic() + 30
    threads = [threading.Thread(target=trickle, args=(port, answers, stop_at)) for _ in range(TRICKLERS)]
    try:
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=20) as c:
            codes = [c.post(f"/v2/models/{MODEL}/infer", json=body(i)).status_code for i in range(NORMAL)]
        for t in threads:
            t.join(40)
    finally:
        stop(proc)
    assert codes.count(200) >= 0.9 * NORMAL, codes
    assert len(answers) == TRICKLERS
    heads = [a.split(b"\r\n", 1)[0] for a, _ in answers]
    assert all(h.startswith(b"HTTP/1.1 408") for h in heads), heads[:5]
    assert all(how == "closed" for _, how in answers)
    assert b"min_upload_bytes_per_s" in answers[0][0]
    assert "Traceback" not in log.read_text()
