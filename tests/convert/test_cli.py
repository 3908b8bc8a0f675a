"""`normfuse convert` end to end, as a real process: vit-digits, a saved Hugging Face directory, and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from convert.rewrites import EXACT_VARIANTS
from engines.manifest import read_manifest, sha256_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def normfuse(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`normfuse ARGS` from this checkout (`-m` from the repository root: the installed console script would
    import whichever checkout the virtual environment was installed from)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "normfuse.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def check_manifest(model_dir: Path):
    manifest = read_manifest(model_dir)
    assert {"unfused", *EXACT_VARIANTS} <= set(manifest.variants) | set(manifest.not_applicable)
    assert all(reason.strip() for reason in manifest.not_applicable.values())
    for name, info in manifest.variants.items():
        assert info.servable == (not info.benchmark_only and all(p.passed for p in info.parity)), name
        assert any(p.candidate.startswith("onnxruntime") for p in info.parity), name  # ORT vs original torch
        assert info.op_census["total"] > 0
        for ref in info.files.values():
            assert sha256_file(model_dir / ref.path) == ref.sha256
    assert manifest.variants[manifest.default_variant].servable
    return manifest


# ----------------------------------------------------------------------------- vit-digits

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    result = normfuse("convert", "vit-digits", "--name", "digits", "--repo", repo, "--samples", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, repo


def test_vit_digits_converts(vit):
    result, repo = vit
    manifest = check_manifest(repo / "digits")
    assert manifest.source == "vit-digits" and manifest.task == "image-classification"
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("images", "FP32", [-1, 8, 8])]
    assert manifest.variants["unfused"].op_census["LayerNormalization"] >= 1
    assert "rewrite/verify/export" in result.stderr  # progress bars go to stderr
    assert f"default variant: {manifest.default_variant}" in result.stdout
    for name in manifest.not_applicable:
        assert f"{name}" in result.stdout and "refused" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert (repo / "digits" / "convert.log").is_file()


def test_vit_digits_default_variant_answers_like_the_original(vit):
    from convert.models import load_source

    _, repo = vit
    source = load_source("vit-digits")
    inputs = source.sample_inputs(20)
    with torch.no_grad():
        reference = source.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    with engines.load(repo, "digits") as engine:
        logits = engine.infer(inputs)["logits"]
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == reference.argmax(1)).all()


# ----------------------------------------------------------------------------- a Hugging Face directory

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    repo = tmp_path_factory.mktemp("repo")
    result = normfuse("convert", directory, "--name", "gpt", "--repo", repo, "--samples", "4", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return directory, repo


def test_hf_directory_converts_with_text_inputs(gpt2):
    _, repo = gpt2
    manifest = check_manifest(repo / "gpt")
    assert manifest.task == "causal-lm"
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("logits", [-1, -1, 97])]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_hf_engine_matches_transformers_on_a_new_length(gpt2, backend):
    from transformers import GPT2LMHeadModel

    directory, repo = gpt2
    ids = np.random.default_rng(5).integers(0, 97, (3, 13))
    model = GPT2LMHeadModel.from_pretrained(directory, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    with engines.load(repo, "gpt", "unfused", backend=backend) as engine:
        logits = engine.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors: one paragraph, exit != 0

def assert_error_paragraph(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("normfuse convert: error:") and "\n\n" not in message
    for needle in needles:
        assert needle in " ".join(message.split()), message


def test_bad_source(tmp_path):
    result = normfuse("convert", "no-such-model", "--name", "x", "--repo", tmp_path / "repo")
    assert_error_paragraph(result, "'no-such-model' is neither a built-in model", "vit-digits")
    assert not (tmp_path / "repo" / "x").exists()


def test_directory_without_weights(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    result = normfuse("convert", tmp_path / "model", "--name", "x", "--repo", tmp_path / "repo")
    assert_error_paragraph(result, "has no *.safetensors weights")


def test_unsupported_architecture(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "audio", safe_serialization=True)
    result = normfuse("convert", tmp_path / "audio", "--name", "x", "--repo", tmp_path / "repo")
    assert_error_paragraph(result, "unsupported architecture 'wav2vec2'", "input_values")


def test_unwritable_repository(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = normfuse("convert", "vit-digits", "--name", "x", "--repo", blocker / "repo")
    assert_error_paragraph(result, "cannot write to model repository", "Choose a --repo directory")


def test_unknown_variant(tmp_path):
    result = normfuse("convert", "vit-digits", "--name", "x", "--repo", tmp_path, "--variants", "affine,fastest")
    assert_error_paragraph(result, "unknown variant(s) ['fastest']")
    assert list(tmp_path.iterdir()) == []


def test_backend_that_cannot_build_here_fails_before_converting(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may be able to build TensorRT engines")
    result = normfuse("convert", "vit-digits", "--name", "x", "--repo", tmp_path, "--backend", "tensorrt")
    assert_error_paragraph(result, "backend 'tensorrt' cannot build engines here")
    assert list(tmp_path.iterdir()) == []
