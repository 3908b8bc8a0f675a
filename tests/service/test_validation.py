"""The one request check before queueing (service.validation) and the engine's own refusal of bad values:
each names the input, the value and the limit; neither is an engine fault."""

import asyncio

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.base import InputError, TensorSpec
from engines.manifest import InputConstraint
from engines.onnxruntime import OnnxRuntimeEngine
from service.batcher import Batcher
from service.validation import check_request

SPECS = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))]
LIMITS = [InputConstraint(name="input_ids", min_value=0, max_value=96, axis_min={1: 1}, axis_max={1: 64},
                          source="config.vocab_size = 97, 64 positions"),
          InputConstraint(name="attention_mask", same_shape_as="input_ids", min_value=0, max_value=1)]


def request(ids, mask=None):
    ids = np.asarray(ids, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)}


@pytest.mark.parametrize(("arrays", "needles"), [
    (request([[1, 2, 97]]), ["'input_ids'", "value 97 at [0, 2]", "[0, 96]", "vocab_size = 97"]),
    (request([[1, -3]]), ["'input_ids'", "value -3 at [0, 1]", "[0, 96]"]),
    (request(np.ones((1, 65))), ["'input_ids'", "dimension 1 is 65", "at most 64"]),
    (request(np.ones((2, 0))), ["'input_ids'", "dimension 1 is 0", "at least 1"]),
    (request([[1, 2]], [[1, 1, 1]]), ["'attention_mask'", "[1, 3]", "'input_ids'", "[1, 2]"]),
    (request([[1, 2]], [[1, 2]]), ["'attention_mask'", "value 2", "[0, 1]"]),
])
def test_values_past_the_manifest_limits_are_input_errors_naming_input_value_and_limit(arrays, needles):
    with pytest.raises(InputError) as raised:
        check_request(SPECS, LIMITS, arrays)
    for needle in needles:
        assert needle in str(raised.value), str(raised.value)


def test_a_good_request_passes_and_reports_its_rows():
    assert check_request(SPECS, LIMITS, request([[0, 96, 5], [1, 1, 1]])) == 2
    assert check_request(SPECS, [], request([[500]])) == 1  # no limits recorded: only the specs


@pytest.fixture
def gather_model(tmp_path):
    """y = table[ids]: a 5-row table, so an id of 5 or more is past it (ONNX Runtime: INVALID_ARGUMENT)."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [5, 2], np.arange(10, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "gather",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 2])], [table])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_engine_refusing_a_value_is_an_input_error_and_only_its_request_fails(gather_model):
    async def main():
        engine = OnnxRuntimeEngine(gather_model).load()
        batcher = Batcher(engine, max_batch_size=8)
        good = [{"ids": np.array([[0, 1, 2]], np.int64)}, {"ids": np.array([[4, 3, 2]], np.int64)}]
        bad = {"ids": np.array([[0, 9, 1]], np.int64)}
        # queued together, before the worker starts: one batch of three, which the engine refuses as a whole
        calls = [asyncio.ensure_future(batcher.submit(x)) for x in (good[0], bad, good[1])]
        await asyncio.sleep(0)
        batcher.start()
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.drain(5)
        return results

    first, refused, last = asyncio.run(main())
    assert isinstance(refused, InputError) and "'ids' (1, 3)" in str(refused) and "idx=9" in str(refused)
    np.testing.assert_array_equal(first.outputs["y"][0, :, 0], [0, 2, 4])
    np.testing.assert_array_equal(last.outputs["y"][0, :, 0], [8, 6, 4])
