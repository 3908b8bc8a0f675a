"""A plan = (variant, engine, precision), loaded and timed behind two small functions.

`load_plan(plan, path, threads)` returns a callable `inputs -> outputs` over the variant's ONNX file; `time_plan`
times one sample of it. Until the OpenVINO engine (engines/openvino.py) lands, the plans are raw sessions:

- onnxruntime / fp32 (or int8 for the `int8` variant's QDQ file): a CPU session, ORT_ENABLE_ALL, `threads`
  intra-op threads (0 = ORT's default, all cores);
- openvino / default: `openvino.Core().compile_model(path, "CPU")` with its defaults — the peer a user would
  pick (only the thread count is set, when the row is a 1-thread row);
- openvino / fp32 or bf16: the same with INFERENCE_PRECISION_HINT f32 or bf16;
- openvino / int8: `nncf.quantize` of the file (TRANSFORMER model type: NNCF's own SmoothQuant, min-max ranges on
  the calibration inputs), compiled with OpenVINO's defaults for everything that stays in float.

Pointing the benchmark at the engine classes later means changing `load_plan` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8", "default")
_OV_HINT = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class Plan:
    variant: str    # the conversion's variant whose ONNX file the plan runs
    engine: str     # onnxruntime | openvino
    precision: str  # fp32 | bf16 | int8 | default (the engine's own choice)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES or self.precision not in PRECISIONS:
            raise ValueError(f"plan {self.name}: engine must be one of {ENGINES} and precision one of {PRECISIONS}")
        if self.engine == "onnxruntime" and self.precision not in ("fp32", "int8"):
            raise ValueError(f"plan {self.name}: ONNX Runtime's CPU provider runs fp32 (or a QDQ int8 file) only")

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.engine}/{self.precision}"

    @classmethod
    def parse(cls, text: str) -> Plan:
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"plan {text!r}: expected VARIANT/ENGINE/PRECISION, e.g. unfused/openvino/bf16")
        return cls(*parts)


BASELINE = Plan("unfused", "onnxruntime", "fp32")
PEER = Plan("unfused", "openvino", "default")
DEFAULT_PLANS = (BASELINE, Plan("rmsnorm", "onnxruntime", "fp32"), Plan("int8", "onnxruntime", "int8"), PEER,
                 Plan("unfused", "openvino", "fp32"), Plan("unfused", "openvino", "bf16"),
                 Plan("rmsnorm", "openvino", "bf16"), Plan("unfused", "openvino", "int8"))


@dataclass
class LoadedPlan:
    plan: Plan
    infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    precision: str  # what the engine reports it runs (OpenVINO's default resolves to f32 or bf16 here)


def load_plan(plan: Plan, path: Path, threads: int, calibration: list[dict] | None = None,
              quantized: dict | None = None) -> LoadedPlan:
    """The plan as a callable. `quantized` caches NNCF's model per file (it does not depend on the threads)."""
    if plan.engine == "onnxruntime":
        return _ort(plan, path, threads)
    import openvino as ov

    core = ov.Core()
    model: object = str(path)
    if plan.precision == "int8":
        key = str(path)
        if quantized is None or key not in quantized:
            model = nncf_int8(core, path, calibration or [])
            if quantized is not None:
                quantized[key] = model
        else:
            model = quantized[key]
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    if plan.precision in _OV_HINT:
        config["INFERENCE_PRECISION_HINT"] = _OV_HINT[plan.precision]
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" or "bf16"
    if plan.precision == "int8":
        precision = f"int8 + {precision}"  # the ops NNCF leaves in float run at this precision

    def infer(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer(inputs)
        return [np.array(results[out]) for out in compiled.outputs]

    return LoadedPlan(plan, infer, precision)


def _ort(plan: Plan, path: Path, threads: int) -> LoadedPlan:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads  # 0: ORT's default (all cores)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return LoadedPlan(plan, lambda inputs: session.run(None, inputs), plan.precision)


def nncf_int8(core, path: Path, calibration: list[dict]):
    """OpenVINO's own int8 form of an ONNX file: nncf.quantize with the transformer preset on `calibration`."""
    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)
    if not calibration:
        raise ValueError(f"{path}: NNCF int8 needs calibration inputs")
    return nncf.quantize(core.read_model(str(path)), nncf.Dataset(calibration), subset_size=len(calibration),
                         model_type=nncf.ModelType.TRANSFORMER)


def time_plan(loaded: LoadedPlan, inputs: dict[str, np.ndarray], calls: int = 1) -> float:
    """Seconds per call over `calls` back-to-back calls: one timed sample."""
    start = time.perf_counter()
    for _ in range(calls):
        loaded.infer(inputs)
    return (time.perf_counter() - start) / calls
