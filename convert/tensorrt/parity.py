"""The TensorRT parity gate: every plan built (fp32 and fp16) is compared at build time with the unfused
ONNX Runtime reference, and the result is recorded in the manifest beside the ONNX Runtime parity.

Inputs are the held-out batch the conversion saved (`parity_inputs.npz`, written by the pipeline). Gates:

- the unfused plan against the unfused ONNX Runtime run: the fixed gate of `convert.verify` for its
  precision (fp32: rel-L2 1e-5, or the float16 gate 1e-2 when TF32 matmuls are allowed; fp16: 1e-2);
- every other plan against the same reference with the low-precision rule of `convert.verify.compare`:
  its error at most twice the unfused plan's own error, argmax agreement at most one position worse.

A plan that fails is deleted (so no engine can load it), the variant is flagged
`tensorrt-parity-failed:<precision>` and is no longer servable (the manifest's rule: servable means every
recorded parity check passed), and the failing comparison stays in the manifest; a default variant that
fails hands the default back to unfused. An unfused plan that fails its gate is an error (RuntimeError,
which the CLI reports as a failed TensorRT build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines.manifest import Manifest, TensorInfo, write_manifest

log = logging.getLogger(__name__)

PARITY_FILE = "parity_inputs.npz"  # beside manifest.json: the held-out batch every backend's gate runs on
PARITY_SAMPLES = 4
TF32_GATE = {"rel_l2": 1e-2}  # TF32 matmuls round inputs to 10 mantissa bits: float16's gate
REFERENCE = "onnxruntime cpu unfused fp32"

PlanRunner = Callable[[Path, dict[str, np.ndarray]], list[np.ndarray]]


def save_parity_inputs(directory: Path, held_out: dict[str, np.ndarray]) -> Path:
    """Keep the first PARITY_SAMPLES held-out samples with the model (the conversion calls this)."""
    path = Path(directory) / PARITY_FILE
    np.savez(path, **{name: array[:PARITY_SAMPLES] for name, array in held_out.items()})
    return path


def parity_inputs(model_dir: Path, inputs: list[TensorInfo]) -> dict[str, np.ndarray]:
    """The saved held-out batch, or (a model converted before it was saved) seeded data of the right shapes:
    normal floats, zero token ids."""
    path = Path(model_dir) / PARITY_FILE
    if path.is_file():
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}
    rng = np.random.default_rng(0)
    out = {}
    for info in inputs:
        shape = [PARITY_SAMPLES if axis == 0 else 8 if d == -1 else d for axis, d in enumerate(info.shape)]
        out[info.name] = (rng.standard_normal(shape).astype(np.float32) if info.datatype.startswith("FP")
                          else np.zeros(shape, dtype=np.int64))
    return out


def onnxruntime_reference(model_dir: Path, manifest: Manifest, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    from convert.export import ort_session

    session = ort_session(Path(model_dir) / manifest.variants["unfused"].files["onnx"].path)
    return [np.asarray(o) for o in session.run([o.name for o in manifest.outputs], inputs)]


def gate_plans(model_dir: Path, manifest: Manifest, plans: dict[str, Path], *, precision: str, tf32: bool,
               run_plan: PlanRunner) -> dict[str, bool]:
    """Run every plan on the parity inputs, record each comparison in the manifest, delete failing plans.
    Returns variant -> passed. The unfused plan is the baseline, so it runs first."""
    from convert.verify import compare

    inputs = parity_inputs(model_dir, manifest.inputs)
    reference = onnxruntime_reference(model_dir, manifest, inputs)
    dtype = "float16" if precision == "fp16" else "float32"
    baseline = run_plan(plans["unfused"], inputs) if "unfused" in plans else None
    passed = {}
    for name, plan in plans.items():
        outputs = baseline if name == "unfused" else run_plan(plan, inputs)
        if name == "unfused" or baseline is None:
            fixed = TF32_GATE if dtype == "float32" and tf32 else None
            comparison = compare(reference, outputs, dtype=dtype, gate=fixed)
        else:
            comparison = compare(reference, outputs, dtype=dtype, baseline=baseline)
        log.info("TensorRT %s %s: %s", precision, name, comparison.summary())
        if name == "unfused" and not comparison:
            Path(plan).unlink(missing_ok=True)
            raise RuntimeError(f"the TensorRT {precision} plan of the unfused model does not match ONNX Runtime "
                               f"({comparison.summary()}); no plan was kept")
        record(manifest, name, comparison.to_parity(REFERENCE, f"tensorrt {precision} {name}"), plan)
        passed[name] = bool(comparison)
    if not manifest.variants[manifest.default_variant].servable:
        manifest.default_variant = "unfused"  # the default's plan failed: serve the reference instead
    write_manifest(Path(model_dir), manifest)
    return passed


def record(manifest: Manifest, name: str, parity, plan: Path) -> None:
    info = manifest.variants[name]
    info.parity = [p for p in info.parity if p.candidate != parity.candidate] + [parity]  # a rebuild replaces it
    flag = f"tensorrt-parity-failed:{parity.candidate.split()[1]}"
    info.flags = [f for f in info.flags if f != flag]
    info.servable = not info.benchmark_only and all(p.passed for p in info.parity)
    if not parity.passed:
        info.flags.append(flag)
        plan.unlink(missing_ok=True)
        plan.with_suffix(".json").unlink(missing_ok=True)  # the sidecar: nothing points at a removed plan


def tensorrt_runner(trt) -> PlanRunner:
    """Run a plan with TensorRT's runtime on the current CUDA device (torch tensors as buffers). GPU only."""

    def run(plan: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        buffers, outputs = {}, []
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name] = torch.from_numpy(np.ascontiguousarray(inputs[name])).cuda()
                context.set_input_shape(name, tuple(buffers[name].shape))
        for name in names:
            if name not in buffers:
                dtype = getattr(torch, str(engine.get_tensor_dtype(name)).split(".")[-1].lower().replace("half", "float16"))
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                outputs.append(name)
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not execute {plan}")
        stream.synchronize()
        return [buffers[name].float().cpu().numpy() for name in outputs]

    return run
