"""Running a plan at conversion (gate and timing): ONNX Runtime through convert.export's session, OpenVINO compiled
with the plan's own properties (engines.plans.openvino_config, the definition the serving engine uses too).

convert shares only the artifact schemas with engines (STYLE.md), as the TensorRT parity gate does
(convert/tensorrt/parity.py runs its plans itself): the runners here are a few lines each, and the compile
properties that decide a plan's numerics come from the one shared definition.

    with open_runner(path, "openvino", "bf16", threads=1) as runner:
        outputs = runner.infer({"images": batch})      # {output name: ndarray}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.plans import openvino_config


class Runner:
    """infer(inputs) -> {output name: array}; close(); a context manager."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrtRunner(Runner):
    def __init__(self, path: Path, threads: int | None) -> None:
        from convert.export import ort_session

        self.session = ort_session(path, threads=threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, inputs), strict=True))

    def close(self) -> None:
        self.session = None


class OpenVinoRunner(Runner):
    def __init__(self, path: Path, precision: str, threads: int | None) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path), "CPU", openvino_config(precision, threads))
        self.request = self.compiled.create_infer_request()
        self.names = [port.get_any_name() for port in self.compiled.outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.request.infer(inputs, share_inputs=True)
        return {name: np.array(self.request.get_tensor(name).data, copy=True) for name in self.names}

    def close(self) -> None:
        self.compiled = self.request = None


def open_runner(path: Path, engine: str, precision: str, threads: int | None) -> Runner:
    """A runner for the plan's file on its engine (ONNX Runtime plans run their ONNX at its own precision)."""
    if engine == "openvino":
        return OpenVinoRunner(path, precision, threads)
    return OrtRunner(path, threads)
