"""Manifests trusted for nothing, one regression test per hole (issue 22): a manifest serves only its own
directory (`name`), names only files inside it (no `..`, no absolute path, no symlink out), and engines load the
bytes they hashed: no pickle that runs code, no ONNX external data from beside the model or the working
directory. Older manifests that are otherwise valid still load. (TensorRT plans and sidecars:
tests/engines/test_tensorrt_glue.py; the real server: tests/e2e/test_tampered_manifests.py.)"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.manifest import ManifestError, file_ref, read_manifest, write_manifest
from tests.service.repo_builder import MODEL, build_test_repo, expected

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_test_repo(tmp_path_factory.mktemp("trust") / "repo", broken=False)


@pytest.fixture
def repo(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "repo", symlinks=True))


def copy_model(repo: Path, name: str, *, manifest_name: str | None = None) -> Path:
    """REPO/name: a copy of REPO/linear whose manifest says `manifest_name` (default: its directory's)."""
    target = Path(shutil.copytree(repo / MODEL, repo / name))
    manifest = read_manifest(target)
    write_manifest(target, manifest.model_copy(update={"name": manifest_name or name}))
    return target


def rewrite_manifest(model_dir: Path, edit) -> None:
    """Edit the manifest's JSON as an attacker would (no validation on the way)."""
    data = json.loads((model_dir / "manifest.json").read_text())
    edit(data)
    (model_dir / "manifest.json").write_text(json.dumps(data))


def answers(repo: Path, name: str, backend: str = "onnxruntime") -> np.ndarray:
    with engines.load(repo, name, backend=backend) as engine:
        return engine.infer({"x": X})["y"]


def test_a_manifest_serves_only_its_own_directory(repo):
    copy_model(repo, "copy", manifest_name=MODEL)  # a copied directory claiming the original's name
    with pytest.raises(ManifestError, match="names the model 'linear', but its directory is 'copy'"):
        engines.load(repo, "copy")
    copy_model(repo, "escape", manifest_name="../linear")
    with pytest.raises(ManifestError, match=r"names the model '\.\./linear', but its directory is 'escape'"):
        engines.load(repo, "escape")
    copy_model(repo, "renamed")  # the same files under its own name: served
    np.testing.assert_array_equal(answers(repo, "renamed"), expected(X))


@pytest.mark.parametrize("name", ["..", ".", "../linear", "a/b", ".hidden", ""])
def test_a_model_name_is_one_visible_directory(repo, name):
    with pytest.raises(ManifestError, match="is not a model name"):
        engines.load(repo, name)


@pytest.mark.parametrize("path", ["../linear/unfused/model.onnx", "unfused/../../linear/unfused/model.onnx",
                                  "/etc/passwd", "ABSOLUTE", "unfused//model.onnx", "./unfused/model.onnx",
                                  "unfused\\model.onnx", "C:/model.onnx"])
def test_file_paths_must_be_relative_without_dotdot(repo, tmp_path, path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(repo / MODEL / "unfused" / "model.onnx", outside)
    path = str(outside) if path == "ABSOLUTE" else path
    model = copy_model(repo, "evil")

    def point_at(data):
        data["variants"]["unfused"]["files"]["onnx"]["path"] = path

    rewrite_manifest(model, point_at)
    with pytest.raises(ManifestError, match="must be relative to the model's directory"):
        engines.load(repo, "evil", "unfused")


def test_a_symlink_out_of_the_model_directory_is_refused(repo, tmp_path):
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    shutil.copy(repo / MODEL / "unfused" / "model.onnx", outside)  # same bytes: the sha256 would match
    model = copy_model(repo, "evil")
    (model / "unfused" / "model.onnx").unlink()
    (model / "unfused" / "model.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match="resolves to .*elsewhere/model.onnx, outside the model's directory"):
        engines.load(repo, "evil", "unfused")
    (model / "unfused" / "model.onnx").unlink()
    (model / "unfused" / "model.onnx").symlink_to(repo / MODEL / "unfused" / "model.onnx")  # a sibling model
    with pytest.raises(ManifestError, match="outside the model's directory"):
        engines.load(repo, "evil", "unfused")


def test_a_symlinked_manifest_out_of_the_directory_is_refused(repo, tmp_path):
    model = copy_model(repo, "evil")
    (tmp_path / "manifest.json").write_bytes((model / "manifest.json").read_bytes())
    (model / "manifest.json").unlink()
    (model / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="the manifest 'manifest.json' resolves to .*, outside"):
        engines.load(repo, "evil")


def test_a_symlink_that_stays_inside_is_followed(repo):
    model = copy_model(repo, "linked")
    (model / "affine" / "model.onnx").unlink()
    (model / "affine" / "model.onnx").symlink_to(Path("..") / "unfused" / "model.onnx")
    with engines.load(repo, "linked", "affine") as engine:
        np.testing.assert_array_equal(engine.infer({"x": X})["y"], expected(X))


@pytest.mark.parametrize("change", ["bytes", "size"])
def test_a_file_unlike_its_hash_is_refused(repo, change):
    model = copy_model(repo, "evil")
    path = model / "unfused" / "model.onnx"
    data = bytearray(path.read_bytes())
    if change == "bytes":
        data[-1] ^= 0xFF
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="onnx file unfused/model.onnx has sha256 .* the manifest expects"):
        engines.load(repo, "evil", "unfused")


def test_the_bytes_loaded_are_the_bytes_hashed(repo, monkeypatch):
    """The ONNX is read once: a file swapped after it was hashed can no longer reach the session."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def session(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    answers(repo, MODEL)
    onnx = (repo / MODEL / "affine" / "model.onnx").read_bytes()
    assert seen == [onnx]  # bytes, not a path ORT would open again


def test_onnx_external_data_comes_only_from_the_manifest(repo, tmp_path, monkeypatch):
    """An ONNX whose weights are external loads only with its `onnx_data` file listed (handed over in memory);
    otherwise the reference is refused, even with the file beside the model or in the working directory."""
    import onnx

    model = copy_model(repo, "external")
    proto = onnx.load(str(model / "unfused" / "model.onnx"))
    onnx.save_model(proto, str(model / "unfused" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    manifest = read_manifest(model)
    files = manifest.variants["unfused"].files
    files["onnx"] = file_ref(model, model / "unfused" / "model.onnx")
    write_manifest(model, manifest)
    shutil.copy(model / "unfused" / "weights.bin", tmp_path / "weights.bin")
    monkeypatch.chdir(tmp_path)  # where ORT looks for external data of a model given as bytes
    with pytest.raises(engines.EngineError, match="External data path"):
        engines.load(repo, "external", "unfused")
    files["onnx_data"] = file_ref(model, model / "unfused" / "weights.bin")
    write_manifest(model, manifest)
    with engines.load(repo, "external", "unfused") as engine:
        np.testing.assert_array_equal(engine.infer({"x": X})["y"], expected(X))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(repo, tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = copy_model(repo, "evil")
    buffer = io.BytesIO()
    torch.save({"module": Payload()}, buffer)
    (model / "unfused" / "model.pt").write_bytes(buffer.getvalue())
    manifest = read_manifest(model)
    manifest.variants["unfused"].files["torch"] = file_ref(model, model / "unfused" / "model.pt")
    write_manifest(model, manifest)
    with pytest.raises(engines.EngineError, match=r"names 'posix\.system', which is not a module"):
        engines.load(repo, "evil", "unfused", backend="torch")
    assert not marker.exists()


def test_the_torch_module_loads_without_a_general_unpickler(repo):
    np.testing.assert_array_equal(answers(repo, MODEL, backend="torch"), expected(X))


def test_an_older_manifest_still_loads(repo):
    """A manifest written before `plans` existed (the key absent) is otherwise valid: it loads and answers."""
    rewrite_manifest(repo / MODEL, lambda data: [v.pop("tensorrt_plans", None) for v in data["variants"].values()])
    assert "tensorrt_plans" not in (repo / MODEL / "manifest.json").read_text()
    np.testing.assert_array_equal(answers(repo, MODEL), expected(X))
    np.testing.assert_array_equal(answers(repo, MODEL, backend="torch"), expected(X))


def test_a_directory_swapped_for_a_link_after_the_check_is_caught_at_the_read(repo, tmp_path):
    """The path is resolved and checked, then (a race) its directory is replaced by a link out: what was opened
    is checked again by its descriptor, so the read still refuses."""
    from engines.manifest import ManifestError, artifacts

    model = copy_model(repo, "racy")
    files = artifacts(model, read_manifest(model).variants["unfused"])
    outside = Path(shutil.copytree(model / "unfused", tmp_path / "elsewhere"))
    (model / "unfused").rename(model / "unfused.real")
    (model / "unfused").symlink_to(outside)
    with pytest.raises(ManifestError, match="opened .*elsewhere/model.onnx, outside the model's directory"):
        files["onnx"].read()


def tiny_hf(family: str):
    import transformers as tf

    small = {"vocab_size": 64}
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, **small))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                          intermediate_size=32, **small))
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                              num_key_value_heads=2, intermediate_size=32, **small))


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_transformers_modules_load_without_a_general_unpickler(family):
    """What `normfuse convert` pickles for Hugging Face sources loads with weights_only=True and answers alike
    (numpy arrays in configs, activations held as functions, the kernels hub's layer rebuilder)."""
    import torch

    from engines.torch import load_module

    model = tiny_hf(family).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = load_module(buffer.getvalue(), Path("model.pt"), "cpu")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected_out, got = model(input_ids=ids)[0], loaded(input_ids=ids)[0]
    assert type(loaded) is type(model) and torch.equal(expected_out, got)


def test_the_kernels_rebuilder_is_refused_outside_model_code(tmp_path):
    import torch

    kernels = pytest.importorskip("kernels._internals.layer.layer")
    from engines.torch import load_module

    class Forged:
        def __reduce__(self):
            return (kernels._rebuild_kernel_func, ("subprocess", "Popen"))

    buffer = io.BytesIO()
    torch.save({"x": Forged()}, buffer)
    with pytest.raises(engines.EngineError, match="asks to rebuild subprocess.Popen, not a model's layer"):
        load_module(buffer.getvalue(), Path("model.pt"), "cpu")
