"""The benchmark's OIP v2 codec (benchmarks/oip.py) and the server's (service/protocol.py) are kept apart, since
nothing may import `service` from `benchmarks`; this checks that each reads what the other writes, for every
datatype both carry, in JSON and in binary."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import oip
from engines.base import DATATYPES
from service import protocol

NUMERIC = [name for name in DATATYPES if name not in ("BYTES", "BF16")]


def sample(datatype: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    values = np.arange(-3, 9).reshape(3, 4)
    if dtype.kind == "b":
        return values % 3 == 0
    if dtype.kind == "u":
        return np.abs(values).astype(dtype)
    return (values * (0.5 if dtype.kind == "f" else 1)).astype(dtype)


def header_length(headers: dict[str, str]) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get(oip.HEADER_LENGTH.lower())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_the_server_reads_the_benchmark_request(datatype, binary):
    x = sample(datatype)
    body, headers = oip.encode_request({"x": x, "mask": np.ones(3, np.bool_)}, binary=binary)
    request, arrays = protocol.decode_request(body, header_length(headers))
    assert [i.name for i in request.inputs] == ["x", "mask"] and request.inputs[0].datatype == datatype
    assert arrays["x"].dtype == x.dtype and arrays["x"].shape == x.shape
    np.testing.assert_array_equal(arrays["x"], x)
    assert protocol.flag(request.parameters, "binary_data_output", False, "") is binary


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_the_benchmark_reads_the_server_response(datatype, binary):
    y = sample(datatype)
    body = {"model_name": "m", "model_version": "unfused", "id": "1",
            "outputs": [{"name": "y", "datatype": datatype, "shape": list(y.shape)}]}
    raw, headers = protocol.encode_body(body, {"y": y}, {"y": binary})
    decoded = oip.decode_response(raw, header_length(headers))["y"]
    assert decoded.dtype == y.dtype and decoded.shape == y.shape
    np.testing.assert_array_equal(decoded, y)
