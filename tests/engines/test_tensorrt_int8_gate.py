"""A lossy variant's TensorRT plan is judged when it is opened: on the held-out inputs saved at conversion it must
meet the variant's own accuracy gate against unfused, or it is refused (fake TensorRT runtime: y = 2x + 1)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import EngineError
from engines.manifest import Accuracy, save_reference
from engines.tensorrt import TensorRTEngine
from tests.engines.test_tensorrt_glue import fakes  # noqa: F401 - the fixture


def accuracy() -> Accuracy:
    return Accuracy(passed=True, reference="onnxruntime cpu unfused fp32", samples=12, rel_l2=0.01, cosine=0.9999,
                    top1_agreement=1.0, gate={"min_top1_agreement": 0.99, "min_cosine": 0.999})


def reference(tmp_path, shift: float) -> tuple:
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float16)
    path = save_reference(tmp_path / "reference.npz", {"x": x}, [x.astype(np.float32) * 2 + 1 + shift])
    return path


def test_a_plan_that_meets_the_gate_is_served(fakes, tmp_path):  # noqa: F811
    engine = TensorRTEngine(fakes.plan, gate=(reference(tmp_path, 0.0), accuracy())).load()
    assert engine.infer({"x": np.ones((1, 4), np.float16)})["y"].tolist() == [[3.0] * 4]
    runs = [c for ctx in fakes.engine.contexts for c in ctx.calls if c[0] == "execute_async_v3"]
    assert len(runs) == 2 + 1  # 12 held-out rows in batches of the profile's max 8, then the request
    engine.close()


def test_a_plan_that_misses_the_gate_is_refused_with_its_figures(fakes, tmp_path):  # noqa: F811
    with pytest.raises(EngineError, match=r"failed its accuracy gate.*cosine"):
        TensorRTEngine(fakes.plan, gate=(reference(tmp_path, 5.0), accuracy())).load()


def test_a_lossy_plan_without_its_reference_file_is_refused(fakes):  # noqa: F811
    with pytest.raises(EngineError, match="reference file"):
        TensorRTEngine(fakes.plan, gate=(None, accuracy())).load()
