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
    # fused mixture-of-experts: exported through transformers' batched_mm experts (grouped_mm is not exportable)
    "qwen2_moe": ("causal-lm", "Qwen2MoeForCausalLM", {"unfused", "affine"}),
    "olmoe": ("causal-lm", "OlmoeForCausalLM", {"unfused", "affine"}),
    "olmo": ("causal-lm", "OlmoForCausalLM", {"rmsnorm", "crmsnorm"}),  # weightless LayerNorm, ε found numerically
}
MOE = ("mixtral", "qwen2_moe", "olmoe")


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
    assert len(output.splitlines()) < 40, output  # no exporter graph dump, whatever the family
    if family in MOE:
        assert all("experts_implementation=batched_mm" in manifest.variants[v].exporter for v in built)


def test_a_saved_moe_directory_converts_and_serves(tmp_path):
    """Mixtral end to end: convert (every variant built or refused, one screen), then serve the default and
    an `affine` request and compare with transformers' own logits."""
    import httpx
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tests.service.server_process import Server

    model, _ = hf.mixtral()
    model.save_pretrained(tmp_path / "mixtral", safe_serialization=True)
    result = normfuse("convert", tmp_path / "mixtral", "--name", "mixtral", "--repo", tmp_path / "repo",
                      "--samples", "4", "--no-benchmark", "--no-torch", "--quiet")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and len(output.splitlines()) < 40, output[-3000:]
    assert "Torch IR graph" not in output and "Traceback" not in output
    manifest = read_manifest(tmp_path / "repo" / "mixtral")
    assert {"unfused", "affine"} <= set(manifest.servable())
    assert "RMSNorm reading the residual stream" in manifest.not_applicable["rmsnorm"]
    assert "batched_mm" in manifest.variants["affine"].exporter
    assert "batched_mm" in (tmp_path / "repo" / "mixtral" / "convert.log").read_text()

    # the directory as transformers loads it (a fresh model's RoPE inv_freq differs from a loaded one's in float32)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", local_files_only=True).eval()
    ids = np.random.default_rng(5).integers(0, hf.VOCAB, size=(3, 11))  # another length and routing than converted
    with torch.no_grad():
        expected = saved(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    srv = Server(tmp_path / "repo")
    try:
        for path in ("mixtral", "mixtral/versions/affine"):
            body = {"inputs": [{"name": n, "shape": list(ids.shape), "datatype": "INT64", "data": d.ravel().tolist()}
                               for n, d in (("input_ids", ids), ("attention_mask", np.ones_like(ids)))],
                    "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}
            response = httpx.post(f"{srv.url}/v2/models/{path}/infer", json=body, timeout=60)
            assert response.status_code == 200, response.text
            logits = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(expected.shape)
            assert np.linalg.norm(logits - expected) <= 1e-5 * np.linalg.norm(expected), path
    finally:
        srv.stop()


def test_a_directory_whose_model_does_not_run_is_a_usage_error(tmp_path):
    """A configuration that loads but cannot run (top-8 routing over 4 experts) fails before any rewrite."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from tests.convert.test_cli import assert_error_paragraph

    config = Qwen2MoeConfig(vocab_size=hf.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=8,
                            moe_intermediate_size=16, shared_expert_intermediate_size=32, max_position_embeddings=32)
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "bad", safe_serialization=True)
    result = normfuse("convert", tmp_path / "bad", "--name", "bad", "--repo", tmp_path / "repo", "--quiet")
    assert_error_paragraph(result, "Qwen2MoeForCausalLM does not run on its example inputs",
                           "input_ids (2, 32) int64", "selected index k out of range")
    assert result.returncode == 2 and not (tmp_path / "repo" / "bad").exists()
    assert "rewrite/verify/export" not in result.stderr  # stopped before any variant
