"""convert.verify: gates pass an exact rewrite and fail a perturbed one; outputs, inputs and records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from convert.rewrites.fold_batchnorm import fold_batchnorms
from convert.verify import FLOOR, Comparison, compare, dtype_name, verify
from engines.manifest import FileRef, Manifest, Parity, TensorInfo, VariantInfo, read_manifest, write_manifest
from tests.convert._cnns import TinyResNet, randomize_batchnorms


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet()).eval()
    folded = copy.deepcopy(model)
    fold_batchnorms(folded, {"x": _images()})
    return model, folded


def _images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def _perturbed(model: nn.Module, relative: float) -> nn.Module:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.fc.weight.mul_(1 + relative)
    return bad


# --- verify: pass, fail, and what is recorded --------------------------------------------------------

def test_a_correct_rewrite_passes_and_records_the_tolerance_it_needed(resnet_pair):
    model, folded = resnet_pair
    comparison = verify(model, folded, _images(), dtype=torch.float32)
    assert isinstance(comparison, Comparison) and comparison and comparison.passed
    assert comparison.dtype == "float32" and comparison.samples == 8
    assert comparison.gate == {"rel_l2": 1e-5}
    assert 0 < comparison.needed["rel_l2"] == comparison.rel_l2 <= 1e-5  # fp32 rounding is not zero
    assert comparison.needed["max_abs"] == comparison.max_abs
    assert comparison.needed["cosine_distance"] == pytest.approx(1 - comparison.cosine)
    assert comparison.argmax_agreement == 1.0 and comparison.needed["argmax_disagreement"] == 0.0


def test_a_perturbed_rewrite_fails(resnet_pair):
    model, folded = resnet_pair
    comparison = verify(model, _perturbed(folded, 1e-3), _images(), dtype=torch.float32)
    assert not comparison
    assert comparison.needed["rel_l2"] > comparison.gate["rel_l2"]
    assert "FAILED float32" in comparison.summary()


def test_float64_gate_is_tighter_than_float32(resnet_pair):
    model, _ = resnet_pair
    model64 = copy.deepcopy(model).double()  # .double() is in place: keep the fixture fp32
    folded64 = copy.deepcopy(model64)
    fold_batchnorms(folded64, {"x": _images()})
    assert verify(model64, folded64, _images(), dtype=torch.float64)
    # a perturbation fp32 would accept is caught in fp64
    slightly_off = _perturbed(folded64, 1e-8)
    assert verify(model64, slightly_off, _images(), dtype=torch.float32)
    assert not verify(model64, slightly_off, _images(), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_identical_models_pass_and_perturbed_fail(resnet_pair, dtype):
    model, _ = resnet_pair
    same = verify(model, copy.deepcopy(model), _images(), dtype=dtype)
    assert same, same.summary()
    assert same.candidate_error == same.reference_error > 0  # both ran the same low-precision math
    assert same.gate["rel_l2"] == pytest.approx(2 * same.reference_error + FLOOR)
    bad = verify(model, _perturbed(model, 0.2), _images(), dtype=dtype)
    assert not bad and bad.candidate_error > bad.gate["rel_l2"]


def test_exactly_equal_low_precision_outputs_pass_on_the_floor():
    reference = [np.array([[1.0, 2.0], [3.0, 4.0]])]
    comparison = compare(reference, reference, dtype="bf16", baseline=reference)
    assert comparison and comparison.gate["rel_l2"] == FLOOR and comparison.needed["rel_l2"] == 0.0


def test_low_precision_argmax_may_drop_by_one_position_only():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 10))
    reference[:3, 0] = reference[:3].max(axis=1) + 1.0
    reference[:3, 1] = reference[:3, 0] - 1e-6  # rows 0-2: a near tie between classes 0 and 1
    baseline = reference + rng.normal(scale=1e-3, size=reference.shape)
    baseline[:3] = reference[:3]  # the original's low-precision run keeps every argmax
    flips = []
    for rows in (1, 2):
        candidate = reference.copy()
        candidate[:rows, [0, 1]] = candidate[:rows, [1, 0]]  # tiny error, but argmax flips
        flips.append(compare(reference, candidate, dtype="float16", baseline=baseline))
    one, two = flips
    assert one.needed["rel_l2"] < one.gate["rel_l2"] and one
    assert two.needed["rel_l2"] < two.gate["rel_l2"] and not two
    assert two.argmax_agreement == pytest.approx(48 / 50) and two.baseline_argmax_agreement == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_runs_on_the_models_device(resnet_pair):
    model, folded = (copy.deepcopy(m).cuda() for m in resnet_pair)
    comparison = verify(model, folded, _images(), dtype=torch.float16)  # CPU inputs follow the model
    assert comparison, comparison.summary()


# --- inputs and models are not modified; inputs are cast by kind --------------------------------------

class _Writer(nn.Module):
    """Writes into its floating input and checks that token ids stay integers."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(11, 4), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.int64
        scale.mul_(2.0)
        return self.proj(self.embed(ids) * scale[:, None, None])  # [B, T, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_inputs_and_models_are_left_as_they_were(dtype):
    torch.manual_seed(0)
    model = _Writer().train()
    ids, scale = torch.tensor([[1, 2, 3], [4, 5, 10]]), torch.tensor([0.5, 1.5])
    comparison = verify(model, model, {"ids": ids, "scale": scale}, dtype=dtype)
    assert comparison and comparison.samples == 2
    # the same model twice: no difference in fp64; in bf16 exactly the original's own error vs fp64
    assert comparison.rel_l2 == (comparison.reference_error if dtype == torch.bfloat16 else 0.0)
    assert torch.equal(scale, torch.tensor([0.5, 1.5])) and ids.dtype == torch.int64
    assert model.training and model.proj.weight.dtype == torch.float32


def test_positional_and_numpy_inputs():
    model = nn.Bilinear(3, 2, 4).eval()
    a, b = np.ones((5, 3), dtype=np.float32), np.ones((5, 2), dtype=np.float32)
    assert verify(model, model, (a, b)).samples == 5


# --- compare: output structures ---------------------------------------------------------------------

def test_compare_matches_dicts_by_key_and_mixes_numpy_and_torch():
    logits, hidden = torch.randn(4, 5), torch.randn(4, 3, 2)
    reference = {"logits": logits, "hidden": hidden}
    candidate = {"hidden": hidden.numpy(), "logits": logits.numpy()}  # other order, numpy
    assert compare(reference, candidate).rel_l2 == 0.0
    assert compare((logits, hidden), [logits.numpy(), hidden]).rel_l2 == 0.0


def test_compare_refuses_mismatched_outputs():
    with pytest.raises(ValueError, match="shapes differ"):
        compare(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="outputs differ"):
        compare({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="gate names"):
        compare(torch.zeros(1), torch.zeros(1), gate={"speed": 1.0})
    with pytest.raises(ValueError, match="no parity gate"):
        dtype_name("int8")


def test_compare_takes_logits_from_a_hugging_face_model_output():
    from transformers.modeling_outputs import SequenceClassifierOutput

    logits = torch.randn(3, 4)
    output = SequenceClassifierOutput(logits=logits, hidden_states=(torch.randn(3, 7, 8),))
    comparison = compare(output, logits.numpy())
    assert comparison.rel_l2 == 0.0 and comparison.argmax_agreement == 1.0


def test_gate_override_and_dtype_aliases():
    reference, candidate = np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7])
    assert compare(reference, candidate, dtype="fp32")
    tight = compare(reference, candidate, dtype=torch.float32, gate={"max_abs": 1e-9})
    assert not tight and tight.gate == {"rel_l2": 1e-5, "max_abs": 1e-9}


def test_non_finite_outputs_fail_and_still_record():
    reference = torch.tensor([[1.0, 2.0], [float("-inf"), 0.5]])
    assert compare(reference, reference.clone())  # equal infinities agree
    candidate = reference.clone()
    candidate[0, 0] = float("nan")
    comparison = compare(reference, candidate)
    assert not comparison and comparison.rel_l2 == float("inf")
    parity = comparison.to_parity("torch fp32", "onnxruntime cpu fp32")
    assert Parity.model_validate_json(parity.model_dump_json()) == parity


# --- the manifest record -----------------------------------------------------------------------------

def test_to_parity_round_trips_through_the_manifest(resnet_pair, tmp_path):
    model, folded = resnet_pair
    comparison = verify(model, folded, _images(), dtype=torch.float32)
    parity = comparison.to_parity("torch unfused fp32", "torch folded fp32")
    assert parity.passed and parity.rel_l2 == comparison.rel_l2 and parity.needed == comparison.needed
    (tmp_path / "folded").mkdir()
    (tmp_path / "folded" / "model.onnx").write_bytes(b"stand-in")
    variant = VariantInfo(
        name="folded", servable=True, parity=[parity],
        files={"onnx": FileRef(path="folded/model.onnx", sha256="0" * 64, bytes=8)},
    )
    manifest = Manifest(
        name="tiny-resnet", source="test", inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, 3, 12, 12])],
        outputs=[TensorInfo(name="logits", datatype="FP32", shape=[-1, 10])],
        variants={"folded": variant}, default_variant="folded",
    )
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path).variants["folded"].parity == [parity]
