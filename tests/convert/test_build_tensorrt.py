"""The TensorRT build glue against a recording fake builder/parser (no GPU or full TensorRT here).

The fake parser reads the real ONNX file, so network inputs, dynamic axes and parse errors come from the
artifact. The fake's enums hold only what the real 10.x / 11.x Python API has: touching a removed name
(BuilderFlag.FP16 on 11.x, EXPLICIT_BATCH) is an AttributeError, as it would be on a GPU host.
"""

from __future__ import annotations

import ast
import enum
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convert.tensorrt.build as build
from engines.manifest import Manifest, TensorInfo, VariantInfo, file_ref, read_manifest, write_manifest
from engines.trt_cache import read_sidecar
from tests.fakes.tensorrt_api import ILogger, Severity

# -- the fake TensorRT builder API ------------------------------------------------------------------


class ParserError:
    def __init__(self, index: int, node: onnx.NodeProto) -> None:
        self.index, self.onnx_node = index, node

    def node(self):
        return self.index

    def node_name(self):
        return self.onnx_node.name

    def node_operator(self):
        return self.onnx_node.op_type

    def desc(self):
        return f"No importer registered for op: {self.onnx_node.op_type}"

    def code(self):
        return "ErrorCode.UNSUPPORTED_NODE"


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[types.SimpleNamespace] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


def make_fake_trt(version: str = "11.4.0.106", *, unsupported: tuple[str, ...] = (), build_fails: bool = False):
    major = int(version.split(".")[0])
    flags = ["TF32", "VERSION_COMPATIBLE", "DISABLE_TIMING_CACHE"] + (["FP16", "INT8"] if major == 10 else [])
    fake = types.SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        BuilderFlag=enum.Enum("BuilderFlag", flags),
        MemoryPoolType=enum.Enum("MemoryPoolType", ["WORKSPACE", "TACTIC_SHARED_MEMORY"]),
        NetworkDefinitionCreationFlag=enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1}),
        builds=[],
        parsed=[],
    )

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        def __bool__(self):
            return bool(self.shapes)

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self) -> None:
            self.pools, self.cleared, self.profiles = {}, [], []
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def clear_flag(self, flag):
            self.cleared.append(flag.name)

        def set_flag(self, flag):
            raise AssertionError(f"no builder flag should be set, got {flag}")

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            model = onnx.load(path)  # with its external data, as TensorRT would read it
            fake.parsed.append((path, model))
            self.errors = [ParserError(i, n) for i, n in enumerate(model.graph.node) if n.op_type in unsupported]
            initializers = {i.name for i in model.graph.initializer}
            for value in model.graph.input:
                if value.name in initializers:
                    continue
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
                self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            assert isinstance(flags, int)
            self.network = FakeNetwork(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            fake.builds.append(types.SimpleNamespace(network=network, config=config))
            if build_fails:
                self.logger.log(Severity.ERROR, "Could not find any implementation for node MatMul_0")
                return None
            return json.dumps({k: list(v) for k, v in config.profiles[0].shapes.items()}).encode()

    fake.Builder, fake.OnnxParser = Builder, OnnxParser
    return fake


# -- a tiny model repository -------------------------------------------------------------------------


def tiny_onnx(path, op: str = "Relu", *, external: bool = False) -> None:
    """y = op(x @ W) with x (batch, 4), a FP32 weight, LayerNormalization first."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    gamma = numpy_helper.from_array(np.ones(4, dtype=np.float32), "gamma")
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "gamma"], ["n"], name="norm_0", axis=-1),
            helper.make_node("MatMul", ["n", "W"], ["h"], name="matmul_0"),
            helper.make_node(op, ["h"], ["y"], name=f"{op.lower()}_0"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight, gamma],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data", size_threshold=0)


def make_repo(tmp_path, op: str = "Relu"):
    model_dir = tmp_path / "tiny"
    variants = {}
    for name in ("unfused", "rmsnorm"):
        (model_dir / name).mkdir(parents=True)
        onnx_path = model_dir / name / "model.onnx"
        tiny_onnx(onnx_path, op, external=True)
        files = {"onnx": file_ref(model_dir, onnx_path),
                 "onnx_data": file_ref(model_dir, model_dir / name / "model.onnx.data")}
        variants[name] = VariantInfo(name=name, servable=True, files=files)
    manifest = Manifest(
        name="tiny", source="test", inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, 4])], variants=variants,
        default_variant="unfused",
    )
    write_manifest(model_dir, manifest)
    return model_dir, manifest


def onnxruntime_runner(perturb: dict[str, float] | None = None):
    """Stands in for TensorRT's runtime: a plan is run as the ONNX it was built from, on ONNX Runtime
    (each variant's output optionally scaled by 1 + perturb[variant], a plan that lost accuracy)."""
    from convert.export import ort_session

    def run(plan: Path, inputs):
        variant = plan.parent.parent.name  # <model>/<variant>/tensorrt/<stem>.plan
        outputs = ort_session(plan.parent.parent / "model.onnx").run(None, inputs)
        return [np.asarray(o) * (1 + (perturb or {}).get(variant, 0.0)) for o in outputs]

    return run


@pytest.fixture
def use_fake(monkeypatch):
    def install(fake, runner=None):
        monkeypatch.setattr(build, "load_tensorrt_builder", lambda: fake)
        monkeypatch.setattr(build, "gpu_identity", lambda device=0: ("Fake H100", "9.0"))
        monkeypatch.setattr(build, "tensorrt_runner", lambda trt: runner or onnxruntime_runner())
        return fake

    return install


def test_builds_one_plan_per_variant_with_profile_workspace_and_timing_cache(tmp_path, use_fake):
    fake = use_fake(make_fake_trt())
    model_dir, manifest = make_repo(tmp_path)
    plans = build.build_engines(model_dir, manifest, precision="fp32", batch_sizes=(1, 8, 32))
    assert [p.parent for p in plans] == [model_dir / "unfused" / "tensorrt", model_dir / "rmsnorm" / "tensorrt"]
    assert json.loads(plans[0].read_bytes()) == {"x": [[1, 4], [8, 4], [32, 4]]}
    built = fake.builds[0]
    assert built.network.flags == 0  # 11.x: always strongly typed, no EXPLICIT_BATCH
    assert built.config.pools == {"WORKSPACE": 1 << 30}
    assert built.config.builder_optimization_level == 3
    # parsed from the file, so the external weights beside it were found
    path, model = fake.parsed[0]
    assert path.endswith("unfused/model.onnx") and len(model.graph.initializer[0].raw_data) == 64
    variant, key = read_sidecar(plans[0])
    assert (variant, key.precision, key.trt_version, key.gpu_name, key.compute_capability) == (
        "unfused", "fp32", "11.4.0.106", "Fake H100", "9.0")
    assert key.profiles["x"].opt == (8, 4)
    timing = model_dir / "trt11.4.0.106.sm90.timing_cache"
    assert timing.read_bytes() == b"+timings+timings"  # the second build loaded the first one's cache


def test_a_matching_plan_is_reused_and_a_new_tensorrt_rebuilds(tmp_path, use_fake):
    model_dir, manifest = make_repo(tmp_path)
    fake = use_fake(make_fake_trt())
    first = build.build_engines(model_dir, manifest, batch_sizes=(1, 8, 32))
    assert build.build_engines(model_dir, manifest, batch_sizes=(1, 8, 32)) == first
    assert len(fake.builds) == 2
    newer = use_fake(make_fake_trt("11.5.0.1"))
    rebuilt = build.build_engines(model_dir, manifest, batch_sizes=(1, 8, 32))
    assert len(newer.builds) == 2 and rebuilt != first and all(p.is_file() for p in first + rebuilt)
    other_profile = build.build_engines(model_dir, manifest, batch_sizes=(1, 4))
    assert len(newer.builds) == 4 and other_profile != rebuilt


def test_fp16_on_11x_parses_the_precision_annotated_onnx_without_builder_flags(tmp_path, use_fake):
    pytest.importorskip("onnxconverter_common")
    fake = use_fake(make_fake_trt("11.4.0.106"))
    model_dir, manifest = make_repo(tmp_path)
    plans = build.build_engines(model_dir, manifest, precision="fp16", batch_sizes=(1, 16))
    path, model = fake.parsed[0]
    assert path.endswith("unfused/tensorrt/model.fp16.onnx")
    types_ = {i.name: i.data_type for i in model.graph.initializer}
    assert types_["W"] == TensorProto.FLOAT16  # matmul weights in FP16
    norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    assert types_[norm.input[1]] == TensorProto.FLOAT  # the norm's scale stays FP32
    assert fake.builds[0].network.flags == 0 and fake.builds[0].config.cleared == []
    key = read_sidecar(plans[0])[1]
    assert key.precision == "fp16" and key.onnx_sha256 != key.source_sha256
    # the FP16 ONNX is regenerated identically, so a second conversion reuses the plans
    assert build.build_engines(model_dir, manifest, precision="fp16", batch_sizes=(1, 16)) == plans
    assert len(fake.builds) == 2


def test_fp16_on_10x_uses_a_strongly_typed_network(tmp_path, use_fake):
    pytest.importorskip("onnxconverter_common")
    fake = use_fake(make_fake_trt("10.16.1.11"))
    model_dir, manifest = make_repo(tmp_path)
    build.build_engines(model_dir, manifest, precision="fp16", batch_sizes=(1, 16))
    assert fake.builds[0].network.flags == 1 << 1
    assert fake.parsed[0][0].endswith("model.fp16.onnx")


def test_tf32_off_clears_the_flag(tmp_path, use_fake):
    fake = use_fake(make_fake_trt())
    model_dir, manifest = make_repo(tmp_path)
    build.build_engines(model_dir, manifest, options=build.BuildOptions(tf32=False, batch_sizes=(2,)))
    assert fake.builds[0].config.cleared == ["TF32"]
    assert json.loads(read_sidecar(next((model_dir / "unfused" / "tensorrt").glob("*.plan")))[1]
                      .to_json()["builder_flags"]["tf32"]) is False


def test_parse_errors_name_the_node_and_operator(tmp_path, use_fake):
    use_fake(make_fake_trt(unsupported=("Mish",)))
    model_dir, manifest = make_repo(tmp_path, op="Mish")
    with pytest.raises(build.OnnxParseError, match=r"node 2 'mish_0' \(operator Mish\): No importer"):
        build.build_engines(model_dir, manifest)


def test_a_failed_build_raises_with_the_captured_log(tmp_path, use_fake):
    use_fake(make_fake_trt(build_fails=True))
    model_dir, manifest = make_repo(tmp_path)
    with pytest.raises(build.EngineBuildError, match=r"(?s)returned None.*\[ERROR\] Could not find any implementation"):
        build.build_engines(model_dir, manifest)
    assert not list((model_dir / "unfused" / "tensorrt").glob("*.plan"))


def test_profiles_cover_dynamic_axes_only():
    inputs = [TensorInfo(name="ids", datatype="INT64", shape=[-1, -1]),
              TensorInfo(name="scale", datatype="FP32", shape=[4])]
    profiles = build.profiles_for(inputs, build.BuildOptions(batch_sizes=(4, 1, 32, 8), other_dynamic=(1, 64, 256)))
    assert set(profiles) == {"ids"}
    assert (profiles["ids"].min, profiles["ids"].opt, profiles["ids"].max) == ((1, 1), (4, 64), (32, 256))


def test_options_reject_nonsense():
    with pytest.raises(ValueError, match="precision"):
        build.BuildOptions(precision="int8")
    with pytest.raises(ValueError, match="batch sizes"):
        build.BuildOptions(batch_sizes=(0, 8))


def test_without_tensorrt_or_gpu_it_fails_fast_saying_what_is_missing(tmp_path):
    """The real check on this machine: no full TensorRT (at most the lean runtime) and no CUDA GPU."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(build.TensorRTUnavailable) as info:
        build.check_tensorrt_available()
    message = str(info.value)
    assert "no CUDA GPU is visible" in message and "--backend onnxruntime" in message
    assert "lean runtime" in message or "`tensorrt` Python module is not installed" in message
    model_dir, manifest = make_repo(tmp_path)
    with pytest.raises(build.TensorRTUnavailable):
        build.build_engines(model_dir, manifest)
    assert not (model_dir / "unfused" / "tensorrt").exists(), "nothing is written before the check"


def test_cli_options_parse_precision_and_batch_sizes():
    import argparse

    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    args = parser.parse_args(["--precision", "fp16", "--batch-sizes", "1,8,32"])
    assert (args.precision, args.batch_sizes) == ("fp16", (1, 8, 32))
    assert parser.parse_args([]).batch_sizes == (1, 8, 32)
    for bad in (["--batch-sizes", "1,x"], ["--batch-sizes", "0,4"], ["--precision", "int8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_convert_cli_hands_its_options_to_the_build_hook(tmp_path, use_fake):
    pytest.importorskip("onnxconverter_common")
    from normfuse.cli import build_parser

    fake = use_fake(make_fake_trt())
    model_dir, manifest = make_repo(tmp_path)
    args = build_parser().parse_args([
        "convert", "vit-digits", "--name", "tiny", "--repo", str(tmp_path), "--backend", "tensorrt",
        "--precision", "fp16", "--batch-sizes", "2,4,16",
    ])
    plans = build.build(model_dir, manifest, args)
    assert len(plans) == 2 and fake.parsed[0][0].endswith("model.fp16.onnx")
    assert read_sidecar(plans[0])[1].profiles["x"].max == (16, 4)


def test_the_convert_cli_fails_fast_without_tensorrt(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    from normfuse.cli import main

    code = main(["convert", "no-such-model", "--name", "x", "--repo", str(tmp_path), "--backend", "tensorrt"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its error paragraph
    assert "--backend tensorrt needs TensorRT's builder and an NVIDIA GPU" in err


def test_convert_imports_only_the_artifact_schemas_from_engines():
    # STYLE.md: convert shares only the artifact schemas (manifest.py, trt_cache.py; plans.py, the plan schema and
    # its compile properties; cpu.py, the CPU record plans are timed on) with engines
    allowed = {"engines.manifest", "engines.trt_cache", "engines.plans", "engines.cpu"}
    found = set()
    for path in Path(build.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {(path.name, n) for n in names if n == "engines" or n.startswith("engines.")}
    assert found and {name for _, name in found} <= allowed, sorted(found)


# -- the parity gate at build time -------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_plan_passes_the_parity_gate_and_it_is_recorded(tmp_path, use_fake, precision):
    if precision == "fp16":
        pytest.importorskip("onnxconverter_common")
    use_fake(make_fake_trt())
    model_dir, manifest = make_repo(tmp_path)
    plans = build.build_engines(model_dir, manifest, precision=precision)
    assert len(plans) == 2
    recorded = read_manifest(model_dir)
    for name in ("unfused", "rmsnorm"):
        (parity,) = [p for p in recorded.variants[name].parity if p.candidate.startswith("tensorrt")]
        assert parity.passed and parity.candidate == f"tensorrt {precision} {name}"
        assert parity.reference == "onnxruntime cpu unfused fp32"
        assert parity.dtype == ("float16" if precision == "fp16" else "float32")
    # the unfused plan has the fixed gate; a variant is held to twice the unfused plan's own error
    assert recorded.variants["unfused"].parity[-1].gate == {"rel_l2": 1e-2}  # TF32 on by default
    assert set(recorded.variants["rmsnorm"].parity[-1].gate) >= {"rel_l2"}


def test_a_plan_that_fails_the_gate_is_removed_and_flagged(tmp_path, use_fake):
    use_fake(make_fake_trt(), runner=onnxruntime_runner({"rmsnorm": 0.05}))
    model_dir, manifest = make_repo(tmp_path)
    plans = build.build_engines(model_dir, manifest)
    assert [p.parent.parent.name for p in plans] == ["unfused"]
    assert not list((model_dir / "rmsnorm" / "tensorrt").glob("*.plan"))
    recorded = read_manifest(model_dir)
    assert recorded.variants["rmsnorm"].flags == ["tensorrt-parity-failed:fp32"]
    assert not recorded.variants["rmsnorm"].parity[-1].passed and not recorded.variants["rmsnorm"].servable
    use_fake(make_fake_trt())  # a good rebuild replaces the record and clears the flag
    assert len(build.build_engines(model_dir, manifest)) == 2
    again = read_manifest(model_dir)
    assert again.variants["rmsnorm"].flags == [] and again.variants["rmsnorm"].parity[-1].passed
    assert again.variants["rmsnorm"].servable
    assert sum(p.candidate.startswith("tensorrt") for p in again.variants["rmsnorm"].parity) == 1


def test_an_unfused_plan_that_does_not_match_onnxruntime_is_an_error(tmp_path, use_fake):
    use_fake(make_fake_trt(), runner=onnxruntime_runner({"unfused": 0.5}))
    model_dir, manifest = make_repo(tmp_path)
    with pytest.raises(RuntimeError, match="unfused model does not match ONNX Runtime"):
        build.build_engines(model_dir, manifest)
    assert not list((model_dir / "unfused" / "tensorrt").glob("*.plan"))


def test_the_gate_uses_the_saved_held_out_batch(tmp_path, use_fake):
    from convert.tensorrt.parity import PARITY_FILE, parity_inputs, save_parity_inputs

    model_dir, manifest = make_repo(tmp_path)
    batch = {"x": np.arange(40, dtype=np.float32).reshape(10, 4)}
    save_parity_inputs(model_dir, batch)
    assert (model_dir / PARITY_FILE).is_file()
    np.testing.assert_array_equal(parity_inputs(model_dir, manifest.inputs)["x"], batch["x"][:4])


@pytest.mark.gpu
def test_real_tensorrt_plans_pass_the_gate(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    pytest.importorskip("tensorrt")
    model_dir, manifest = make_repo(tmp_path)
    assert len(build.build_engines(model_dir, manifest, batch_sizes=(1, 4))) == 2
    assert all(p.passed for info in read_manifest(model_dir).variants.values() for p in info.parity)


def test_each_gated_plan_is_recorded_in_the_manifest_with_its_hash_and_key(tmp_path, use_fake):
    """What the server opens (engines.tensorrt.recorded_plan): only plans the manifest lists, hashed, with
    their build key; a plan removed by its gate leaves no record; no host code unless version-compatible."""
    from engines.manifest import sha256_file
    from engines.trt_cache import read_sidecar

    use_fake(make_fake_trt(), runner=onnxruntime_runner({"rmsnorm": 0.05}))
    model_dir, manifest = make_repo(tmp_path)
    [plan] = build.build_engines(model_dir, manifest)
    recorded = read_manifest(model_dir)
    [record] = recorded.variants["unfused"].tensorrt_plans
    assert record.path == plan.relative_to(model_dir).as_posix() and record.sha256 == sha256_file(plan)
    assert record.key == read_sidecar(plan)[1].to_json() and record.host_code_allowed is False
    assert recorded.variants["rmsnorm"].tensorrt_plans == []  # failed its gate: removed, not recorded
    use_fake(make_fake_trt())
    build.build_engines(model_dir, manifest)  # a rebuild of the same paths replaces their records
    again = read_manifest(model_dir)
    assert [len(again.variants[name].tensorrt_plans) for name in ("unfused", "rmsnorm")] == [1, 1]
