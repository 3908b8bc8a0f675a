"""`make run` reuses a conversion whose manifest is current (normfuse.current) and converts again otherwise."""

import json

from normfuse.current import stale_reasons
from tests.service.repo_builder import MODEL, build_test_repo


def test_a_current_conversion_is_reused_and_each_kind_of_staleness_is_named(tmp_path):
    repo = build_test_repo(tmp_path / "repo", broken=False)
    model_dir = repo / MODEL
    source = json.loads((model_dir / "manifest.json").read_text())["source"]
    assert stale_reasons(model_dir, source) == []
    assert stale_reasons(model_dir, "vit-digits") == [f"converted from {source!r}, not 'vit-digits'"]

    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["tools"] = {"numpy": "0.0.1"}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    assert any("numpy 0.0.1" in r and "installed now" in r for r in stale_reasons(model_dir, source))

    manifest["tools"] = {}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    onnx = next(model_dir.glob("*/model.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"x")
    assert any("modified after conversion" in r for r in stale_reasons(model_dir, source))
    assert "no manifest.json" in stale_reasons(tmp_path / "nothing", source)[0]
