import warnings
from pathlib import Path

import pytest


def export_tiny_onnx(path: Path, width: int = 16) -> Path:
    """A tiny Pre-LN MLP (dynamic batch, FP32 `x` -> `y`) exported with torch's legacy exporter."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU()).eval()
    return export_tiny_onnx_module(model, path, width)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")


def build_bench_repo(root: Path, name: str = "tiny", width: int = 16) -> Path:
    """REPO/NAME with variants `unfused`, `affine` (same function) and the benchmark-only `nonorm` bound."""
    import torch

    from engines.manifest import Manifest, Parity, TensorInfo, VariantInfo, file_ref, write_manifest

    torch.manual_seed(0)
    with_norm = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width)).eval()
    without = torch.nn.Sequential(torch.nn.Identity(), with_norm[1]).eval()
    model_dir = root / name
    parity = Parity(passed=True, reference="torch unfused fp32", candidate="onnxruntime cpu fp32", dtype="float32",
                    samples=4, max_abs=0.0, rel_l2=0.0, cosine=1.0, gate={"max_abs": 1e-4}, needed={"max_abs": 0.0})
    variants = {}
    for variant, module in (("unfused", with_norm), ("affine", with_norm), ("nonorm", without)):
        path = export_tiny_onnx_module(module, model_dir / variant / "model.onnx", width)
        bound = variant == "nonorm"
        variants[variant] = VariantInfo(name=variant, exact=not bound, servable=not bound, benchmark_only=bound,
                                        files={"onnx": file_ref(model_dir, path)},
                                        parity=[] if bound else [parity])
    io = {"inputs": [TensorInfo(name="x", datatype="FP32", shape=[-1, width])],
          "outputs": [TensorInfo(name="y", datatype="FP32", shape=[-1, width])]}
    write_manifest(model_dir, Manifest(name=name, source="test", variants=variants, default_variant="unfused",
                                       max_batch_size=16, **io))
    return root


def export_tiny_onnx_module(module, path: Path, width: int) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (torch.randn(2, width),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="session")
def bench_repo(tmp_path_factory) -> Path:
    return build_bench_repo(tmp_path_factory.mktemp("repo"))
