"""Each peer serves the same function as the engine it wraps: one real round trip per peer and protocol."""

import httpx
import numpy as np
import pytest

from benchmarks import loadgen
from benchmarks.peers import launch
from benchmarks.serving_bench import PROTOCOLS
from engines.onnxruntime import OnnxRuntimeEngine
from oip import codec


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["plain", "litserve", "triton"])
def test_peer_answers_what_the_engine_answers(kind, tiny_onnx, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with OnnxRuntimeEngine(tiny_onnx, intra_op_threads=1) as engine:
        expected = engine.infer({"x": x})["y"]
    with launch.start(kind, log_dir=tmp_path, onnx=str(tiny_onnx), model="tiny", threads=1, max_batch_size=4) as s:
        for protocol in PROTOCOLS[kind]:
            body, headers = codec.encode_request({"x": x}, binary=protocol == "binary")
            response = httpx.post(loadgen.infer_url(s.base_url, "tiny"), content=body, headers=headers, timeout=30)
            assert response.status_code == 200, response.text[:500]
            got = codec.decode_response(response.content, response.headers.get(codec.HEADER_LENGTH))[1]["y"]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert s.process.poll() is not None  # stopped on exit


def test_a_server_whose_port_was_taken_is_started_again_on_other_ports(tmp_path):
    """A port chosen free can be taken before the server binds it (by another process, or a client's ephemeral
    port): launch starts the server again on other ports; any other failure is raised at once."""
    import sys

    marker = tmp_path / "tried"
    taken_once = (f"import pathlib, sys; m = pathlib.Path({str(marker)!r})\n"
                  "if not m.exists(): m.touch(); sys.exit('gRPC cannot listen on 127.0.0.1:1 (address already in use)')\n"
                  "import http.server; http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), "
                  "bind='127.0.0.1')")
    server = launch._launch("plain", lambda port: [sys.executable, "-c", taken_once, str(port)], {}, tmp_path, "/",
                            30.0)
    try:
        assert httpx.get(server.base_url + "/", timeout=10).status_code == 200
        assert marker.exists() and "already in use" not in server.log_path.read_text()  # the second try serves
    finally:
        launch.stop(server)
    with pytest.raises(RuntimeError, match="broken"):
        launch._launch("plain", lambda port: [sys.executable, "-c", "raise SystemExit('broken')"], {}, tmp_path, "/",
                       30.0)
