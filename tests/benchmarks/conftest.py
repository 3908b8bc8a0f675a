from pathlib import Path

import pytest


def export_tiny_onnx(path: Path, width: int = 16) -> Path:
    """A tiny Pre-LN MLP (dynamic batch, FP32 `x` -> `y`) exported with torch's legacy exporter."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU()).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.randn(2, width),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")
