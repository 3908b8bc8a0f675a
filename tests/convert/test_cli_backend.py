"""`normfuse convert --backend X`: a backend that fails after the ONNX conversion gives an error paragraph
(naming what failed) and a non-zero exit, not a traceback."""

from __future__ import annotations

import pytest

from engines.manifest import FileRef, Manifest, TensorInfo, VariantInfo


def _manifest() -> Manifest:
    spec = [TensorInfo(name="x", datatype="FP32", shape=[-1, 4])]
    unfused = VariantInfo(name="unfused", servable=True,
                          files={"onnx": FileRef(path="unfused/model.onnx", sha256="0" * 64, bytes=1)})
    return Manifest(name="m", source="test", inputs=spec, outputs=spec, variants={"unfused": unfused},
                    default_variant="unfused")


@pytest.mark.parametrize("error", ["EngineBuildError", "OnnxParseError"])
def test_a_backend_build_failure_is_an_error_paragraph(error, monkeypatch, tmp_path, capsys):
    import convert.pipeline
    import convert.tensorrt.build as trt_build
    from normfuse.cli import main

    def failing_build(model_dir, manifest, args):
        raise getattr(trt_build, error)("node 3 'mish_0' (operator Mish): unsupported")

    monkeypatch.setattr(trt_build, "check", lambda args: None)
    monkeypatch.setattr(trt_build, "build", failing_build)
    monkeypatch.setattr(convert.pipeline, "convert", lambda *a, **k: _manifest())
    code = main(["convert", "vit-digits", "--name", "m", "--repo", str(tmp_path), "--backend", "tensorrt"])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 2
    assert "Traceback" not in captured.err
    assert "the ONNX variants were written to" in err and "building tensorrt engines failed" in err
    assert "node 3 'mish_0' (operator Mish)" in err
    assert "default variant: unfused" in captured.out  # the conversion summary was still printed
