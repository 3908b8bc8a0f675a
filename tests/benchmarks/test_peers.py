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
