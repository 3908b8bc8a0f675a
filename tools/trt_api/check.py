"""Check the TensorRT API surface our code uses, without a GPU (tensorrt.md checklist item 5).

    python tools/trt_api/check.py [--root .]

Three checks; any finding exits 1:

(a) runtime  every TensorRT name engines/tensorrt.py uses exists in the installed `tensorrt_lean`
             (Runtime, ICudaEngine, IExecutionContext, TensorIOMode, DataType, ILogger, ...);
(b) builder  every TensorRT name convert/tensorrt/build.py uses is listed in builder_api.txt for every
             supported major (10 and 11), and, where `tensorrt_lean` has the class too, exists there;
(c) removed  no project file uses an API that 10.x or 11.x removed: the bindings API, execute_async_v2,
             EXPLICIT_BATCH, FP16/INT8/... builder flags, layer precision, max_workspace_size, build_engine.

Names are found with `ast`: `trt.X.Y` chains, and `var.method` on variables whose name says what TensorRT
object they hold (VARIABLE_TYPES). Docstrings and comments are never matched.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDER_API = HERE / "builder_api.txt"
SUPPORTED_MAJORS = ("10", "11")
RUNTIME_FILES = ("engines/tensorrt.py", "engines/trt_cache.py")  # trt_cache holds the TensorRT logger
BUILDER_FILE = "convert/tensorrt/build.py"

# variable (or self attribute) name -> the TensorRT class it holds, by our naming convention
VARIABLE_TYPES = {
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "_engine": "ICudaEngine",
    "ctx": "IExecutionContext",
    "context": "IExecutionContext",
    "_context": "IExecutionContext",
    "severity": "ILogger.Severity",
    "builder": "Builder",
    "network": "INetworkDefinition",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "error": "IParserError",
    "profile": "IOptimizationProfile",
    "tensor": "ITensor",
    "cache": "ITimingCache",
}
TRT_MODULE_NAMES = {"trt", "tensorrt", "tensorrt_lean"}

REMOVED_NAMES = {
    "execute_async_v2": "removed in 10.0: use set_tensor_address + execute_async_v3",
    "execute_async": "removed in 10.0: use execute_async_v3",
    "EXPLICIT_BATCH": "ignored in 10.x and removed in 11.x: pass 0 or STRONGLY_TYPED",
    "num_bindings": "bindings API removed in 10.0: use num_io_tensors",
    "set_binding_shape": "removed in 10.0: use set_input_shape",
    "set_output_type": "weak typing removed in 11.0: write precision into the ONNX",
    "platform_has_fast_fp16": "removed in 11.0",
    "platform_has_fast_int8": "removed in 11.0",
    "max_workspace_size": "removed in 10.0: use set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)",
    "build_engine": "removed in 10.0: use build_serialized_network",
    "compute_precision": "INormalizationLayer.compute_precision removed in 11.0",
    "supports_model": "removed in 11.0: use supports_model_v2",
    "parse_with_weight_descriptors": "removed in 11.0",
    "device_memory_size": "removed in 11.0: use device_memory_size_v2",
    "OBEY_PRECISION_CONSTRAINTS": "weak typing removed in 11.0",
    "PREFER_PRECISION_CONSTRAINTS": "weak typing removed in 11.0",
}
REMOVED_PREFIXES = {"get_binding_": "bindings API removed in 10.0", "binding_": "bindings API removed in 10.0"}
REMOVED_BUILDER_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"}
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", "build", "dist", "model_repository", ".bench"}


# -- finding names -------------------------------------------------------------------------------------
def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; `self._ctx.x` -> ["_ctx", "x"]; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        parts.reverse()
        return parts[1:] if parts[0] == "self" else parts
    return None


def used_names(source: str) -> set[str]:
    """Qualified TensorRT names (e.g. "ICudaEngine.get_tensor_name", "BuilderFlag.TF32") used in `source`."""
    tree = ast.parse(source)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent  # type: ignore[attr-defined]
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "parent", None), ast.Attribute):
            continue  # only whole chains: `trt.BuilderFlag.TF32`, not its `trt.BuilderFlag` part
        chain = _chain(node)
        if not chain or len(chain) < 2:
            continue
        if chain[0] in TRT_MODULE_NAMES:
            names.add(".".join(chain[1:3]))
        elif chain[0] in VARIABLE_TYPES and len(chain) == 2:
            names.add(f"{VARIABLE_TYPES[chain[0]]}.{chain[1]}")
    return names


def names_in_file(path: Path) -> set[str]:
    return used_names(path.read_text())


# -- (a) runtime names against tensorrt_lean -------------------------------------------------------------
def resolve(module, qualified: str) -> bool:
    obj = module
    for part in qualified.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def check_runtime(root: Path, module=None) -> list[str]:
    module = module or importlib.import_module("tensorrt_lean")
    return [
        f"{path}: {name} does not exist in tensorrt_lean {module.__version__}"
        for path in RUNTIME_FILES
        if (root / path).is_file()
        for name in sorted(names_in_file(root / path))
        if not resolve(module, name)
    ]


# -- (b) builder names against the checked-in list ------------------------------------------------------
def read_builder_api(path: Path = BUILDER_API) -> dict[str, set[str]]:
    """builder_api.txt -> {qualified name: {majors that have it}}."""
    api = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, *majors = line.split()
            api[name] = set(majors)
    return api


def check_builder(root: Path, api: dict[str, set[str]] | None = None, lean=None) -> list[str]:
    api = api if api is not None else read_builder_api()
    problems = []
    for name in sorted(names_in_file(root / BUILDER_FILE)):
        if name not in api:
            problems.append(f"{BUILDER_FILE}: {name} is not in {BUILDER_API.name}; add it with its majors")
            continue
        missing = [m for m in SUPPORTED_MAJORS if m not in api[name]]
        if missing:
            problems.append(f"{BUILDER_FILE}: {name} does not exist in TensorRT {'/'.join(missing)}.x")
        if lean is not None and resolve(lean, name.split(".")[0]) and not resolve(lean, name):
            problems.append(f"{BUILDER_FILE}: {name} is missing from tensorrt_lean {lean.__version__}")
    return problems


# -- (c) removed APIs anywhere --------------------------------------------------------------------------
def removed_api_uses(source: str, filename: str = "<source>") -> list[str]:
    tree = ast.parse(source)
    found = []

    def report(node: ast.AST, what: str, why: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}: {why}")

    for node in ast.walk(tree):
        ident = node.attr if isinstance(node, ast.Attribute) else None  # TensorRT API names are attributes
        if ident is not None:
            if ident in REMOVED_NAMES:
                report(node, ident, REMOVED_NAMES[ident])
            for prefix, why in REMOVED_PREFIXES.items():
                if ident.startswith(prefix):
                    report(node, ident, why)
        if isinstance(node, ast.Attribute) and node.attr in REMOVED_BUILDER_FLAGS:
            chain = _chain(node.value) or []
            if chain[-1:] == ["BuilderFlag"]:
                report(node, f"BuilderFlag.{node.attr}", "removed in 11.0: precision lives in the ONNX")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            args = node.args
            if len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
                owner = _chain(args[0]) or []
                name = args[1].value
                if name in REMOVED_NAMES or (owner[-1:] == ["BuilderFlag"] and name in REMOVED_BUILDER_FLAGS):
                    report(node, f"{node.func.id}(..., {name!r})", "a removed TensorRT API, reached by name")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "precision":
                    owner = target.value
                    if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                        report(target, "layer.precision = ...", "ILayer.precision removed in 11.0")
    return found


def project_files(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.resolve() == Path(__file__).resolve():
            continue
        yield path


def check_removed(root: Path) -> list[str]:
    problems = []
    for path in project_files(root):
        try:
            problems += removed_api_uses(path.read_text(), str(path.relative_to(root)))
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(root)}: cannot parse ({exc})")
    return problems


def run_all(root: Path) -> list[str]:
    try:
        lean = importlib.import_module("tensorrt_lean")
    except ImportError:
        return ["tensorrt_lean is not installed: `pip install -e '.[test]'` (it pins tensorrt-lean)"]
    return check_runtime(root, lean) + check_builder(root, lean=lean) + check_removed(root)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else HERE.parent.parent
    problems = run_all(root.resolve())
    for line in problems:
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"trt_api check: {len(problems)} problem(s)\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
