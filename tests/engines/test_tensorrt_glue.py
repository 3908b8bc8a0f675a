"""TensorRTEngine's glue, run against a recording fake of TensorRT and of the CUDA device.

Neither TensorRT's builder nor a GPU exist here, so the fakes stand in for exactly those two and record
every call; the assertions are the checklist of tensorrt.md ("correct without a GPU in CI", item 6).
The real `tensorrt_lean` module is used where it can run without a GPU (logger capture, fallback import).
"""

from __future__ import annotations

import ast
import contextlib
import enum
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import engines.tensorrt as trt_engine
from engines.base import EngineError, InputError
from engines.trt_cache import EngineKey, ShapeProfile, write_sidecar
from tests.fakes.tensorrt_api import ILogger, Severity

# -- a recording fake of the TensorRT runtime API -------------------------------------------------


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4
    BF16 = 7


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class FakeContext:
    """Records calls; computes y = 2 * x + 1 reading and writing the buffers at the given addresses."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.calls: list[tuple] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.fail: set[str] = set()

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if "set_input_shape" in self.fail:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self.calls.append(("get_tensor_shape", name))
        if "x" not in self.shapes:  # like TensorRT: unknown until the input shapes are set
            return (-1, 4)
        return self.shapes["x"]

    def set_tensor_address(self, name, address):
        self.calls.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        if "execute_async_v3" in self.fail:
            return False
        memory = FakeCuda.current.memory
        x, y = memory[self.addresses["x"]], memory[self.addresses["y"]]
        y.copy_(x.float() * 2 + 1)
        return True


class FakeEngine:
    io = [("x", TensorIOMode.INPUT, DataType.HALF, (-1, 4)), ("y", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, 4))]
    profile = ((1, 4), (4, 4), (8, 4))

    def __init__(self) -> None:
        self.num_io_tensors = len(self.io)
        self.contexts: list[FakeContext] = []
        self.context_fails = False

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return self._find(name)[2]

    def get_tensor_shape(self, name):
        return self._find(name)[3]

    def get_tensor_profile_shape(self, name, profile_index):
        assert self.get_tensor_mode(name) == TensorIOMode.INPUT, "profile shapes exist for inputs only"
        assert profile_index == 0
        return self.profile

    def create_execution_context(self):
        if self.context_fails:
            return None
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def make_fake_trt(engine: FakeEngine | None) -> types.SimpleNamespace:
    fake = types.SimpleNamespace(__version__="11.4.0.106", ILogger=ILogger, DataType=DataType, TensorIOMode=TensorIOMode)

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False
            fake.runtime = self

        def deserialize_cuda_engine(self, plan: bytes):
            if engine is None:
                self.logger.log(Severity.ERROR, "Serialization assertion: plan built by TensorRT 10.16 failed")
            return engine

    fake.Runtime = Runtime
    return fake


class FakeStream:
    cuda_stream = 0xBEEF  # a non-default stream handle (the default stream is 0)


class FakeCuda:
    """The CUDA device on CPU tensors: records uploads, the current stream, and synchronizations."""

    current: FakeCuda

    def __init__(self, index: int = 0) -> None:
        FakeCuda.current = self
        self.memory: dict[int, torch.Tensor] = {}
        self.uploads: list[torch.Tensor] = []
        self.syncs = 0
        self.active_stream = None
        self.streams: list[FakeStream] = []

    def name(self):
        return "Fake GPU"

    def compute_capability(self):
        return "9.0"

    def active(self):
        return contextlib.nullcontext()

    def new_stream(self):
        self.streams.append(FakeStream())
        return self.streams[-1]

    @contextlib.contextmanager
    def on(self, stream):
        self.active_stream = stream
        try:
            yield
        finally:
            self.active_stream = None

    def _keep(self, tensor):
        assert self.active_stream is not None, "device work outside the engine's stream"
        self.memory[tensor.data_ptr()] = tensor
        return tensor

    def upload(self, array, dtype):
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(getattr(torch, dtype)).contiguous()
        self.uploads.append(tensor)
        return self._keep(tensor)

    def empty(self, shape, dtype):
        return self._keep(torch.empty(shape, dtype=getattr(torch, dtype)))

    def download(self, tensor):
        return tensor.clone()

    def synchronize(self, stream):
        assert stream is self.streams[-1]
        self.syncs += 1


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    engine = FakeEngine()
    fake_trt = make_fake_trt(engine)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_engine, "CudaDevice", FakeCuda)
    plan = tmp_path / "v.fp16.plan"
    plan.write_bytes(b"serialized plan")
    key = EngineKey("s" * 64, "o" * 64, "11.4.0.106", "Fake GPU", "9.0", "fp16",
                    {"x": ShapeProfile(*FakeEngine.profile)})
    write_sidecar(plan, "v", key)
    return types.SimpleNamespace(engine=engine, trt=fake_trt, plan=plan)


def batch(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n * 4, dtype=np.float16).reshape(n, 4)}


def test_specs_and_max_batch_come_from_the_engine_and_profile(fakes):
    with trt_engine.TensorRTEngine(fakes.plan) as eng:
        assert [(s.name, s.datatype, s.shape) for s in eng.inputs] == [("x", "FP16", (-1, 4))]
        assert [(s.name, s.datatype, s.shape) for s in eng.outputs] == [("y", "FP32", (-1, 4))]
        assert eng.max_batch_size == 8
        assert eng.describe() == {
            "runtime": "tensorrt", "precision": "fp16", "plan": "v.fp16.plan", "version": "11.4.0.106",
            "device": "Fake GPU",
        }
        assert fakes.trt.runtime.engine_host_code_allowed is False  # not a version-compatible plan


def test_infer_sets_every_address_on_a_non_default_stream_and_syncs_once(fakes):
    with trt_engine.TensorRTEngine(fakes.plan) as eng:
        x = np.asfortranarray(np.arange(12, dtype=np.float16).reshape(3, 4))  # not C-contiguous
        out = eng.infer({"x": x})
        np.testing.assert_array_equal(out["y"], x.astype(np.float32) * 2 + 1)
        assert out["y"].dtype == np.float32
        ctx = fakes.engine.contexts[0]
        cuda = FakeCuda.current
        # every I/O tensor got an address, and it is the address of a live device buffer
        addresses = {c[1]: c[2] for c in ctx.calls if c[0] == "set_tensor_address"}
        assert set(addresses) == {"x", "y"}
        assert all(addr in cuda.memory for addr in addresses.values())
        # the input buffer is contiguous and has the engine's dtype (HALF), not whatever arrived
        x_buffer = cuda.memory[addresses["x"]]
        assert x_buffer.dtype == torch.float16 and x_buffer.is_contiguous()
        # the output shape is read after the input shape is set
        names = [c[0] for c in ctx.calls]
        assert names.index("get_tensor_shape") > names.index("set_input_shape")
        assert ("set_input_shape", "x", (3, 4)) in ctx.calls
        # enqueued on the engine's own stream, never the default stream (handle 0)
        assert ctx.calls[-1] == ("execute_async_v3", FakeStream.cuda_stream)
        assert cuda.syncs == 1
        eng.infer(batch(1))
        eng.infer(batch(8))
        assert cuda.syncs == 3


def test_batch_beyond_the_profile_max_is_refused_not_truncated(fakes):
    with trt_engine.TensorRTEngine(fakes.plan) as eng:
        with pytest.raises(InputError, match="exceeds this engine's maximum of 8"):
            eng.infer(batch(9))
        assert fakes.engine.contexts[0].calls == []


def test_shape_outside_the_profile_is_an_input_error(fakes, monkeypatch):
    monkeypatch.setattr(FakeEngine, "profile", ((2, 4), (4, 4), (8, 4)))
    with trt_engine.TensorRTEngine(fakes.plan) as eng:
        with pytest.raises(InputError, match=r"outside the engine's optimization profile min \(2, 4\)"):
            eng.infer(batch(1))


def test_deserialize_none_raises_with_the_log_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: make_fake_trt(None))
    monkeypatch.setattr(trt_engine, "CudaDevice", FakeCuda)
    plan = tmp_path / "old.plan"
    plan.write_bytes(b"x")
    with pytest.raises(EngineError, match=r"(?s)deserialize_cuda_engine returned None.*rebuild.*TensorRT 10\.16"):
        trt_engine.TensorRTEngine(plan).load()


def test_missing_plan_and_missing_context_raise(fakes, tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        trt_engine.TensorRTEngine(tmp_path / "nope.plan").load()
    fakes.engine.context_fails = True
    with pytest.raises(EngineError, match="create_execution_context returned None"):
        trt_engine.TensorRTEngine(fakes.plan).load()


@pytest.mark.parametrize("call", ["set_input_shape", "execute_async_v3"])
def test_false_returns_raise_with_context(fakes, call):
    with trt_engine.TensorRTEngine(fakes.plan) as eng:
        fakes.engine.contexts[0].fail.add(call)
        with pytest.raises(EngineError, match=call):
            eng.infer(batch(2))


def test_unservable_io_dtype_is_refused_at_load(fakes, monkeypatch):
    monkeypatch.setattr(FakeEngine, "io", [("x", TensorIOMode.INPUT, DataType.BF16, (-1, 4))])
    with pytest.raises(EngineError, match="BF16"):
        trt_engine.TensorRTEngine(fakes.plan).load()


def test_closed_engine_refuses_to_run(fakes):
    eng = trt_engine.TensorRTEngine(fakes.plan).load()
    eng.close()
    with pytest.raises(EngineError, match="not loaded"):
        eng.infer(batch(1))


def test_importing_engines_does_not_import_tensorrt():
    code = (
        "import sys, engines, engines.tensorrt, engines.trt_cache\n"
        "bad = [m for m in ('tensorrt', 'tensorrt_lean') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_falls_back_to_the_lean_runtime(monkeypatch):
    pytest.importorskip("tensorrt_lean")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert trt_engine.import_tensorrt().__name__ == "tensorrt_lean"


def test_capturing_logger_works_with_the_real_lean_runtime():
    pytest.importorskip("tensorrt_lean")
    # in a subprocess: the lean runtime's CUDA probing is not something to do inside the test process
    code = (
        "import tensorrt_lean as trt\n"
        "from engines.trt_cache import capturing_logger\n"
        "logger = capturing_logger(trt)\n"
        "logger.log(trt.ILogger.Severity.INFO, 'not kept')\n"
        "logger.log(trt.ILogger.Severity.WARNING, 'kept')\n"
        "runtime = trt.Runtime(logger)\n"  # without a GPU this logs a CUDA initialization error
        "print(repr(list(logger.lines)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    lines = ast.literal_eval(out.strip().splitlines()[-1])
    assert lines[0] == "[WARNING] kept"
    assert not any("not kept" in line for line in lines)


def test_find_plan_picks_the_plan_for_this_onnx_precision_trt_and_gpu(fakes, tmp_path):
    from engines.manifest import FileRef, VariantInfo
    from engines.trt_cache import EngineCacheError, plan_path, variant_source_sha256

    files = {"onnx": FileRef(path="rmsnorm/model.onnx", sha256="1" * 64, bytes=1)}
    variant = VariantInfo(name="rmsnorm", servable=True, files=files)
    plan_dir = tmp_path / "repo" / "rmsnorm" / "tensorrt"
    plan_dir.mkdir(parents=True)
    profile = {"x": ShapeProfile(*FakeEngine.profile)}
    for precision, gpu in [("fp16", "Fake GPU"), ("fp32", "Fake GPU"), ("fp16", "Other GPU")]:
        key = EngineKey(variant_source_sha256(files), "o" * 64, "11.4.0.106", gpu, "9.0", precision, profile)
        plan = plan_path(plan_dir, "rmsnorm", key)
        plan.write_bytes(b"plan")
        write_sidecar(plan, "rmsnorm", key)
    found = trt_engine.find_plan(tmp_path / "repo", variant, precision="fp16")
    assert read_key(found) == ("fp16", "Fake GPU")
    with trt_engine.TensorRTEngine(found) as eng:
        assert eng.describe()["precision"] == "fp16"
    assert read_key(trt_engine.find_plan(tmp_path / "repo", variant, precision="fp32")) == ("fp32", "Fake GPU")
    fakes.trt.__version__ = "11.5.0.1"
    with pytest.raises(EngineCacheError, match=r"trt_version '11\.4\.0\.106' != '11\.5\.0\.1'"):
        trt_engine.find_plan(tmp_path / "repo", variant, precision="fp16")


def read_key(plan):
    from engines.trt_cache import read_sidecar

    key = read_sidecar(plan)[1]
    return key.precision, key.gpu_name


def _tiny_trt_repo(tmp_path, *, record: bool = True, version_compatible: bool = False):
    """REPO/tiny with one variant, its plan (and sidecar) built for the fake GPU, recorded in the manifest as
    `normfuse convert --backend tensorrt` records it (unless `record`: a manifest from before plans were)."""
    from convert.tensorrt.build import record_plans
    from engines.manifest import Manifest, TensorInfo, VariantInfo, file_ref, write_manifest
    from engines.trt_cache import plan_path, variant_source_sha256

    model_dir = tmp_path / "repo" / "tiny"
    (model_dir / "unfused").mkdir(parents=True)
    (model_dir / "unfused" / "model.onnx").write_bytes(b"an onnx file")
    files = {"onnx": file_ref(model_dir, model_dir / "unfused" / "model.onnx")}
    manifest = Manifest(
        name="tiny", source="test", inputs=[TensorInfo(name="x", datatype="FP16", shape=[-1, 4])],
        outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, 4])],
        variants={"unfused": VariantInfo(name="unfused", servable=True, files=files)}, default_variant="unfused",
    )
    write_manifest(model_dir, manifest)
    key = EngineKey(variant_source_sha256(files), "o" * 64, "11.4.0.106", "Fake GPU", "9.0", "fp32",
                    {"x": ShapeProfile(*FakeEngine.profile)},
                    builder_flags={"version_compatible": "true" if version_compatible else "false"})
    plan = plan_path(model_dir / "unfused" / "tensorrt", "unfused", key)
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    write_sidecar(plan, "unfused", key)
    if record:
        record_plans(model_dir, manifest, {"unfused": plan}, {"unfused": key})
    return model_dir, plan, key


def test_engines_load_opens_the_tensorrt_backend(fakes, tmp_path):
    import engines

    _, plan, _ = _tiny_trt_repo(tmp_path)
    with engines.load(tmp_path / "repo", "tiny", backend="tensorrt", intra_op_threads=2) as engine:
        assert engine.describe()["plan"] == plan.name
        assert engine.max_batch_size == 8  # the profile's maximum, not the manifest's 32
        np.testing.assert_array_equal(engine.infer(batch(2))["y"], batch(2)["x"].astype(np.float32) * 2 + 1)
    assert fakes.trt.runtime.engine_host_code_allowed is False


def test_a_plan_the_manifest_does_not_record_is_not_opened(fakes, tmp_path):
    """A manifest from before plans were recorded (otherwise valid) asks for a rebuild; the plan on disk, its
    sidecar matching, is never deserialized."""
    import engines
    from engines.trt_cache import EngineCacheError

    _tiny_trt_repo(tmp_path, record=False)
    with pytest.raises(EngineCacheError, match="the manifest records none"):
        engines.load(tmp_path / "repo", "tiny", backend="tensorrt")
    assert not hasattr(fakes.trt, "runtime")  # no Runtime was even made


def test_a_plan_whose_bytes_differ_from_the_record_is_refused(fakes, tmp_path):
    import engines
    from engines.manifest import ManifestError

    _, plan, _ = _tiny_trt_repo(tmp_path)
    plan.write_bytes(b"pla!")  # same size, other bytes
    with pytest.raises(ManifestError, match="tensorrt plan .* has sha256 .* modified after conversion"):
        engines.load(tmp_path / "repo", "tiny", backend="tensorrt")


def test_host_code_runs_only_when_the_manifest_says_so_not_a_sidecar(fakes, tmp_path):
    import json

    import engines
    from engines.trt_cache import sidecar_path

    _, plan, _ = _tiny_trt_repo(tmp_path)  # recorded as not version-compatible
    sidecar = json.loads(sidecar_path(plan).read_text())
    sidecar["key"]["builder_flags"]["version_compatible"] = "true"  # a sidecar claiming host code
    sidecar_path(plan).write_text(json.dumps(sidecar))
    with engines.load(tmp_path / "repo", "tiny", backend="tensorrt"):
        assert fakes.trt.runtime.engine_host_code_allowed is False
    with trt_engine.TensorRTEngine(plan):  # a plan opened by path (tools, tests) never trusts its sidecar either
        assert fakes.trt.runtime.engine_host_code_allowed is False

    _tiny_trt_repo(tmp_path / "compatible", version_compatible=True)
    with engines.load(tmp_path / "compatible" / "repo", "tiny", backend="tensorrt"):
        assert fakes.trt.runtime.engine_host_code_allowed is True  # the manifest's record, hash matching


def test_without_a_gpu_loading_fails_fast_saying_so(tmp_path):
    """No fakes: this machine's real lean runtime (or none) and real torch without CUDA."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    plan = tmp_path / "v.plan"
    plan.write_bytes(b"never deserialized")
    with pytest.raises(EngineError, match="TensorRT (needs a CUDA GPU|is not installed)"):
        trt_engine.TensorRTEngine(plan).load()
