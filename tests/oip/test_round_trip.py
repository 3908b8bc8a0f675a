"""One codec, both directions: what a client (the load generator) encodes the server decodes, and what the server
encodes the client decodes, for every datatype, in JSON and in binary; the response decoder is as strict as the
request decoder."""

import numpy as np
import pytest

from benchmarks.inputs import random_inputs
from engines.base import DATATYPES
from oip import codec
from oip.parameters import flag, priority_of


def sample(datatype: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    values = np.arange(-3, 9).reshape(3, 4)
    if dtype.kind == "b":
        return values % 3 == 0
    if dtype.kind == "u":
        return np.abs(values).astype(dtype)
    return (values * (0.5 if dtype.kind == "f" else 1)).astype(dtype)


def header_length(headers: dict[str, str]) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get(codec.HEADER_LENGTH.lower())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_request_round_trip(datatype, binary):
    x = sample(datatype)
    body, headers = codec.encode_request({"x": x, "mask": np.ones(3, np.bool_)}, binary=binary)
    request, arrays = codec.decode_request(body, header_length(headers))
    assert [i.name for i in request.inputs] == ["x", "mask"] and request.inputs[0].datatype == datatype
    assert arrays["x"].dtype == x.dtype and arrays["x"].shape == x.shape
    np.testing.assert_array_equal(arrays["x"], x)
    assert flag(request.parameters, "binary_data_output", False, "") is binary
    if binary:
        assert int(headers[codec.HEADER_LENGTH]) == len(body) - x.nbytes - 3


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_response_round_trip(datatype, binary):
    y = sample(datatype)
    body = {"model_name": "m", "model_version": "unfused", "id": "1",
            "outputs": [{"name": "y", "datatype": datatype, "shape": list(y.shape)}]}
    raw, headers = codec.encode_body(body, {"y": y}, {"y": binary})
    response, decoded = codec.decode_response(raw, header_length(headers))
    assert response.model_version == "unfused"
    assert decoded["y"].dtype == y.dtype and decoded["y"].shape == y.shape
    np.testing.assert_array_equal(decoded["y"], y)


def test_non_finite_json_outputs_read_back():
    y = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    raw, headers = codec.encode_outputs("m", {"y": y}, binary=False)
    np.testing.assert_array_equal(codec.decode_response(raw, header_length(headers))[1]["y"], y)


def test_parameters_travel_with_the_request():
    body, headers = codec.encode_request({"x": np.ones((1, 2), np.float32)}, binary=False,
                                         parameters={"priority": 2, "timeout": 1000})
    request, _ = codec.decode_request(body, header_length(headers))
    assert priority_of(request.parameters) == 2
    with pytest.raises(codec.ProtocolError, match="'priority' must be an integer"):
        priority_of({"priority": -1})
    assert priority_of({}) == 0


def test_truncated_or_inconsistent_bodies_are_refused_both_ways():
    body, headers = codec.encode_request({"x": np.ones((2, 3), np.float32)}, binary=True)
    with pytest.raises(codec.ProtocolError, match="truncated"):
        codec.decode_request(body[:-4], headers[codec.HEADER_LENGTH])
    with pytest.raises(codec.ProtocolError, match="but the body has only"):
        codec.decode_request(body, str(len(body) + 1))
    with pytest.raises(codec.ProtocolError, match="not valid JSON"):
        codec.decode_request(b"not json", None)
    raw, headers = codec.encode_outputs("m", {"y": np.ones((2, 2), np.float32)}, binary=True)
    with pytest.raises(codec.ProtocolError, match="truncated"):
        codec.decode_response(raw[:-1], headers[codec.HEADER_LENGTH])
    with pytest.raises(codec.SchemaError, match="model_name"):
        codec.decode_response(b'{"outputs": []}', None)
    with pytest.raises(codec.ProtocolError, match="needs 4 values"):  # the lax copy reshaped silently
        codec.decode_response(b'{"model_name":"m","outputs":[{"name":"y","shape":[2,2],"datatype":"FP32",'
                              b'"data":[1,2,3]}]}', None)


def test_random_inputs_follow_specs():
    specs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 5]},
             {"name": "attention_mask", "datatype": "INT64", "shape": [-1, 5]},
             {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 2, 2]}]
    x = random_inputs(specs, 4, vocab=10)
    assert x["input_ids"].shape == (4, 5) and x["input_ids"].max() < 10
    assert (x["attention_mask"] == 1).all()
    assert x["pixels"].shape == (4, 3, 2, 2) and x["pixels"].dtype == np.float32
    with pytest.raises(ValueError, match="dynamic axis"):
        random_inputs([{"name": "t", "datatype": "INT64", "shape": [-1, -1]}], 1)
