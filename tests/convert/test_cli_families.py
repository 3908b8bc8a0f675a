"""`normfuse convert DIR` on saved Hugging Face directories of several families, as a new user runs it: each
finishes with every variant built or refused with a one-line reason in the user's own names, never a traceback."""

from __future__ import annotations

import pytest

from convert.rewrites import EXACT_VARIANTS
from engines.manifest import read_manifest
from tests.convert import _hf_families as hf
from tests.convert.test_cli import normfuse

pytestmark = pytest.mark.e2e

# family -> (task, class, variants that must be built)
EXPECTED = {
    "convnext": ("image-classification", "ConvNextForImageClassification", {"affine"}),
    "swin": ("image-classification", "SwinForImageClassification", {"affine"}),
    "t5_encoder": ("feature-extraction", "T5EncoderModel", {"affine"}),  # loads as itself, not encoder–decoder
    "llama": ("causal-lm", "LlamaForCausalLM", {"affine"}),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_convert_a_saved_directory(family, tmp_path):
    task, class_name, built = EXPECTED[family]
    model, _ = hf.FAMILIES[family]()
    model.save_pretrained(tmp_path / family, safe_serialization=True)
    result = normfuse("convert", tmp_path / family, "--name", family, "--repo", tmp_path / "repo", "--samples", "4",
                      "--no-benchmark", "--no-torch", "--quiet")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeywordModel" not in output and "model.model." not in output
    manifest = read_manifest(tmp_path / "repo" / family)
    assert manifest.task == task
    assert manifest.not_applicable["folded"].startswith(f"{class_name} has no BatchNorm")  # the user's class
    assert built <= {name for name, info in manifest.variants.items() if info.servable}
    summary = result.stdout.splitlines()
    for variant in ("unfused", *EXACT_VARIANTS):
        line = next(line for line in summary if line.split()[:1] == [variant])
        assert " built " in line or " refused " in line, line
        assert len(line) < 200, line
    for reason in manifest.not_applicable.values():
        assert "KeywordModel" not in reason and not reason.startswith("model.model")
    assert (tmp_path / "repo" / family / "convert.log").is_file()
