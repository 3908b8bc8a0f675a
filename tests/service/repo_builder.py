"""Build a tiny model repository whose answers are known exactly, for service, deploy and benchmark tests.

    from tests.service.repo_builder import build_test_repo, expected
    repo = build_test_repo(tmp_path)          # REPO/linear (unfused + affine), REPO/broken (corrupt artifact)

`linear`: y = x @ W with a small integer W, FP32, x (-1, 4) -> y (-1, 3), dynamic batch, as model.onnx and
model.pt (the torch backend's pickled module, role "torch"); both variants are exact, so integer-valued inputs give exactly `expected(x)`. `broken`: a manifest whose ONNX file is garbage
(sha256 matches, so the failure is the runtime refusing to load it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from engines.manifest import Manifest, Parity, TensorInfo, VariantInfo, file_ref, write_manifest

W = np.array([[1, 0, 2], [0, 1, -1], [1, 1, 0], [2, 0, 1]], dtype=np.float32)
MODEL, BROKEN = "linear", "broken"
FEATURES, OUTPUTS = W.shape


def expected(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) @ W.astype(np.float64)).astype(np.float32)


class Linear(torch.nn.Module):
    """y = x @ W, at module level so model.pt (a pickled module) can import it as tests.service.repo_builder.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.from_numpy(W.copy()))

    def forward(self, x):  # (batch, 4) -> (batch, 3)
        return x @ self.w


def _export(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    module = Linear().eval()
    with warnings.catch_warnings():  # the legacy exporter warns that it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (torch.zeros(1, FEATURES),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    # the torch backend's artifact, as convert/export.py's export_torch writes it (role "torch" in the manifest)
    torch.save(module, str(path.with_name("model.pt")))


def _parity() -> Parity:
    return Parity(passed=True, reference="numpy x @ W", candidate="onnxruntime cpu fp32", dtype="float32",
                  samples=8, max_abs=0.0, rel_l2=0.0, cosine=1.0, gate={"max_abs": 1e-5}, needed={"max_abs": 0.0})


def _files(model_dir: Path, variant: str) -> dict:
    files = {"onnx": file_ref(model_dir, model_dir / variant / "model.onnx")}
    if (model_dir / variant / "model.pt").is_file():
        files["torch"] = file_ref(model_dir, model_dir / variant / "model.pt")
    return files


def _manifest(name: str, model_dir: Path, variants: list[str]) -> Manifest:
    infos = {
        v: VariantInfo(name=v, servable=True, files=_files(model_dir, v), parity=[_parity()], description="y = x @ W")
        for v in variants
    }
    return Manifest(name=name, source="tests.service.repo_builder", task="test",
                    inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, FEATURES])],
                    outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, OUTPUTS])],
                    max_batch_size=8, variants=infos, default_variant=variants[-1])


def build_test_repo(path: Path, broken: bool = True) -> Path:
    """Write REPO/linear (variants unfused, affine) and, if `broken`, REPO/broken under `path`; return REPO."""
    repo = Path(path)
    model_dir = repo / MODEL
    _export(model_dir / "unfused" / "model.onnx")
    (model_dir / "affine").mkdir(parents=True, exist_ok=True)
    for artifact in ("model.onnx", "model.pt"):
        (model_dir / "affine" / artifact).write_bytes((model_dir / "unfused" / artifact).read_bytes())
    write_manifest(model_dir, _manifest(MODEL, model_dir, ["unfused", "affine"]))
    if not broken:
        return repo
    broken = repo / BROKEN
    (broken / "unfused").mkdir(parents=True, exist_ok=True)
    (broken / "unfused" / "model.onnx").write_bytes(b"this is not an ONNX file")
    write_manifest(broken, _manifest(BROKEN, broken, ["unfused"]))
    return repo


def add_int8_variant(model_dir: Path) -> None:
    """Add a real lossy variant `int8` to REPO/linear: ONNX Runtime static QDQ int8 of its unfused ONNX, with the
    accuracy record and gate measured on held-out inputs (as `convert` writes them), for the live dashboard test."""
    from convert.export import ort_session, run_onnx
    from convert.quantize import Int8Options, passes_gate, quantize_onnx
    from engines.manifest import Accuracy, accuracy_figures, read_manifest

    rng = np.random.default_rng(5)
    calibration = [{"x": rng.integers(0, 7, (8, FEATURES)).astype(np.float32)} for _ in range(4)]
    held_out = {"x": rng.integers(0, 7, (64, FEATURES)).astype(np.float32)}
    quantization = quantize_onnx(model_dir / "unfused" / "model.onnx", model_dir / "int8" / "model.onnx", calibration)
    figures = accuracy_figures([expected(held_out["x"])], run_onnx(ort_session(model_dir / "int8" / "model.onnx"), held_out))
    options = Int8Options()
    passed, failed = passes_gate(figures, options)
    accuracy = Accuracy(passed=passed, reference="numpy x @ W", samples=64, rel_l2=figures["rel_l2"],
                        cosine=figures["cosine"], top1_agreement=figures["top1_agreement"], failed=failed,
                        gate={"min_top1_agreement": options.min_agreement, "min_cosine": options.min_cosine},
                        quantization=quantization)
    manifest = read_manifest(model_dir)
    manifest.variants["int8"] = VariantInfo(name="int8", exact=False, servable=passed, accuracy=accuracy,
                                            files={"onnx": file_ref(model_dir, model_dir / "int8" / "model.onnx")},
                                            description="y = x @ W in int8")
    write_manifest(model_dir, Manifest.model_validate(manifest.model_dump()))
