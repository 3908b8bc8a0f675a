"""The demo model `vit-digits`: accuracy, input contract, held-out sampling, determinism, cache, ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from convert.models import load_source
from convert.models import vit_digits as vd

TINY = vd.ViTConfig(dim=16, depth=1, heads=2)
TINY_RECIPE = vd.TrainRecipe(epochs=1, batch_size=256)


@pytest.fixture(scope="module")
def source():
    return load_source("vit-digits")


def test_trained_model_reaches_95_percent_on_the_held_out_split(source):
    assert source.metrics["test_accuracy"] >= 0.95
    assert source.evaluate(source.model) == source.metrics
    assert not source.model.training


def test_input_contract(source):
    assert [t.model_dump() for t in source.inputs] == [{"name": "images", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert [t.model_dump() for t in source.outputs] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    from sklearn.datasets import load_digits

    raw = load_digits().images[:5].astype(np.float32)  # exactly what sklearn gives: 0–16, no preprocessing
    with torch.no_grad():
        logits = source.model(images=torch.from_numpy(raw))
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert (logits.argmax(-1).numpy() == load_digits().target[:5]).mean() >= 0.8


def test_sample_inputs_come_from_the_test_split_and_cycle(source):
    x_train, x_test, _, _ = vd.digits_split()
    n = len(x_test) + 3
    batch = source.sample_inputs(n)["images"]
    assert batch.shape == (n, 8, 8) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[: len(x_test)], x_test)
    np.testing.assert_array_equal(batch[len(x_test):], x_test[:3])
    train_rows = {row.tobytes() for row in x_train}
    held_out = [row.tobytes() not in train_rows for row in x_test]
    assert np.mean(held_out) > 0.95  # a few digits are pixel-identical across the split; the rows are not shared


def test_training_is_deterministic():
    a = vd.train(TINY, TINY_RECIPE).state_dict()
    b = vd.train(TINY, TINY_RECIPE).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = vd.train(TINY, vd.TrainRecipe(epochs=1, batch_size=256, seed=1)).state_dict()
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_weights_are_cached_on_disk_and_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vd, "_STATES", {})
    first = vd.trained_state(TINY, TINY_RECIPE)
    files = list((tmp_path / "vit-digits").glob("*.pt"))
    assert len(files) == 1 and vd.cache_key(TINY, TINY_RECIPE) in files[0].name
    assert vd.trained_state(TINY, TINY_RECIPE) is first                 # in-process hit
    monkeypatch.setattr(vd, "_STATES", {})
    from_disk = vd.trained_state(TINY, TINY_RECIPE)                      # disk hit, not a retrain
    assert from_disk is not first and all(torch.equal(first[k], from_disk[k]) for k in first)
    assert vd.cache_key(TINY, TINY_RECIPE) != vd.cache_key(TINY, vd.TrainRecipe(epochs=2, batch_size=256))


def test_a_corrupt_cache_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vd, "_STATES", {})
    path = tmp_path / "vit-digits" / f"layernorm-{vd.cache_key(TINY, TINY_RECIPE)}.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    state = vd.trained_state(TINY, TINY_RECIPE)
    assert "head.weight" in state and torch.load(path, weights_only=True).keys() == state.keys()


def test_onnx_export_with_dynamic_batch(source, tmp_path):
    path = tmp_path / "vit.onnx"
    example = torch.from_numpy(source.sample_inputs(2)["images"])
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        source.model, (), str(path), kwargs={"images": example}, input_names=["images"], output_names=["logits"],
        dynamo=True, dynamic_shapes={"images": {0: batch}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for n in (1, 7):
        images = source.sample_inputs(n)["images"]
        (logits,) = session.run(["logits"], {"images": images})
        with torch.no_grad():
            expected = source.model(images=torch.from_numpy(images)).numpy()
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm"):
        vd.ViT(vd.ViTConfig(norm="batchnorm"))


@pytest.mark.slow  # trains vit-digits-un once (then the weight cache answers)
def test_the_un_trained_demo_reaches_layernorm_accuracy():
    """The UN paper's claim at demo scale: Unified Normalization within 1 point of LayerNorm."""
    ln, un = vd.vit_digits(), vd.vit_digits_un()
    assert un.metrics["test_accuracy"] >= ln.metrics["test_accuracy"] - 0.01, (un.metrics, ln.metrics)
