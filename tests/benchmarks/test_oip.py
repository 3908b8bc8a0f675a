import numpy as np
import pytest

from benchmarks import oip


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip(binary):
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([[1, 2]], dtype=np.int64)}
    body, headers = oip.encode_request(inputs, binary=binary)
    header, decoded = oip.decode_request(body, headers.get(oip.HEADER_LENGTH))
    assert oip.wants_binary(header) is binary
    for name, array in inputs.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)
    if binary:
        assert int(headers[oip.HEADER_LENGTH]) == len(body) - 6 * 4 - 2 * 8


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip(binary):
    outputs = {"y": np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)}
    body, headers = oip.encode_response("m", outputs, binary=binary)
    np.testing.assert_array_equal(oip.decode_response(body, headers.get(oip.HEADER_LENGTH))["y"], outputs["y"])


def test_truncated_binary_body_is_refused():
    body, headers = oip.encode_request({"x": np.ones((2, 3), np.float32)}, binary=True)
    with pytest.raises(oip.ProtocolError, match="body ends"):
        oip.decode_request(body[:-4], headers[oip.HEADER_LENGTH])
    with pytest.raises(oip.ProtocolError, match="outside the body"):
        oip.decode_request(body, str(len(body) + 1))
    with pytest.raises(oip.ProtocolError, match="JSON header"):
        oip.decode_request(b"not json", None)


def test_random_inputs_follow_specs():
    specs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 5]},
             {"name": "attention_mask", "datatype": "INT64", "shape": [-1, 5]},
             {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 2, 2]}]
    x = oip.random_inputs(specs, 4, vocab=10)
    assert x["input_ids"].shape == (4, 5) and x["input_ids"].max() < 10
    assert (x["attention_mask"] == 1).all()
    assert x["pixels"].shape == (4, 3, 2, 2) and x["pixels"].dtype == np.float32
    with pytest.raises(ValueError, match="dynamic axis"):
        oip.random_inputs([{"name": "t", "datatype": "INT64", "shape": [-1, -1]}], 1)
