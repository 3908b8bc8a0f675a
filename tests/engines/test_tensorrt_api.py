"""The TensorRT API surface check (tools/trt_api/check.py), run by the normal test command in CI.

Runtime-side names are checked against the real `tensorrt_lean` wheel (pinned in the test extra);
builder-side names against tools/trt_api/builder_api.txt; removed APIs are linted everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("trt_api_check", ROOT / "tools" / "trt_api" / "check.py")
check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check)

lean = pytest.importorskip("tensorrt_lean")


def test_the_project_passes_every_check():
    assert check.run_all(ROOT) == []
    assert check.main(["--root", str(ROOT)]) == 0


def test_the_runtime_check_is_not_vacuous():
    used = set().union(*(check.names_in_file(ROOT / path) for path in check.RUNTIME_FILES))
    assert {
        "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
        "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_profile_shape",
        "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
        "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3", "TensorIOMode.INPUT",
        "ILogger", "ILogger.Severity.WARNING",
    } <= used
    builder = check.names_in_file(ROOT / check.BUILDER_FILE)
    assert {"Builder.build_serialized_network", "OnnxParser.parse_from_file", "IParserError.node_operator",
            "IBuilderConfig.set_memory_pool_limit", "IOptimizationProfile.set_shape"} <= builder


def write_project(tmp_path, runtime: str = "", builder: str = "") -> Path:
    (tmp_path / "engines").mkdir()
    (tmp_path / check.BUILDER_FILE).parent.mkdir(parents=True)  # convert/tensorrt/
    (tmp_path / check.RUNTIME_FILES[0]).write_text(runtime)
    (tmp_path / check.BUILDER_FILE).write_text(builder)
    return tmp_path


def test_a_runtime_name_missing_from_tensorrt_is_reported(tmp_path):
    root = write_project(tmp_path, runtime="def run(ctx, engine):\n    engine.get_tensor_name(0)\n"
                                           "    ctx.execute_async_v4(0)\n")
    assert check.check_runtime(root, lean) == [
        "engines/tensorrt.py: IExecutionContext.execute_async_v4 does not exist in tensorrt_lean 11.4.0.106"
    ]


def test_builder_names_are_checked_against_the_list_for_both_majors(tmp_path):
    root = write_project(tmp_path, builder=(
        "def build(trt, config, builder):\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"
        "    builder.create_network(0)\n"
        "    config.made_up_setting = 1\n"
    ))
    problems = check.check_builder(root, lean=lean)
    assert "convert/tensorrt/build.py: BuilderFlag.FP16 does not exist in TensorRT 11.x" in problems
    assert any("IBuilderConfig.made_up_setting is not in builder_api.txt" in p for p in problems)
    assert not any("create_network" in p for p in problems)


def test_the_checked_in_list_agrees_with_the_lean_wheel():
    """Enums present in both the list and tensorrt_lean 11.x: '11' entries exist there, others do not."""
    api = check.read_builder_api()
    compared = 0
    for name, majors in api.items():
        owner, _, member = name.partition(".")
        if not member or owner not in ("BuilderFlag", "MemoryPoolType", "HardwareCompatibilityLevel",
                                       "ProfilingVerbosity", "NetworkDefinitionCreationFlag"):
            continue
        if not hasattr(lean, owner):
            continue  # NetworkDefinitionCreationFlag is builder-only
        assert hasattr(getattr(lean, owner), member) == ("11" in majors), name
        compared += 1
    assert compared >= 20
    assert api["NetworkDefinitionCreationFlag.EXPLICIT_BATCH"] == {"10"}
    assert api["BuilderFlag.FP16"] == {"10"}


@pytest.mark.parametrize(
    "code",
    [
        "ctx.execute_async_v2(bindings, stream)",
        "engine.get_binding_shape(0)",
        "engine.binding_is_input(0)",
        "ctx.set_binding_shape(0, (1, 3))",
        "n = engine.num_bindings",
        "flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)",
        "config.set_flag(trt.BuilderFlag.FP16)",
        "config.set_flag(trt.BuilderFlag.INT8)",
        "config.set_flag(tensorrt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)",
        "flag = getattr(trt.BuilderFlag, 'FP16')",
        "layer.precision = trt.float32",
        "network[0].precision = trt.float32",
        "layer.set_output_type(0, trt.float32)",
        "ok = builder.platform_has_fast_fp16",
        "config.max_workspace_size = 1 << 30",
        "engine = builder.build_engine(network, config)",
    ],
)
def test_removed_apis_are_caught(code):
    assert check.removed_api_uses(code, "x.py"), code


@pytest.mark.parametrize(
    "code",
    [
        '"""Never use EXPLICIT_BATCH or BuilderFlag.FP16 (a docstring)."""',
        "self.precision = 'fp16'",
        "plan = builder.build_serialized_network(network, config)",
        "def build_engines(model_dir):\n    return build_engines",
        "binding = session.io_binding()",
        "config.clear_flag(trt.BuilderFlag.TF32)",
        "ctx.execute_async_v3(stream.cuda_stream)",
        "size = engine.device_memory_size_v2",
    ],
)
def test_current_apis_are_not_flagged(code):
    assert check.removed_api_uses(code, "x.py") == []
