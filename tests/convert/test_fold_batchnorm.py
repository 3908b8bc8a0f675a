"""BatchNorm folding: the math per layer kind, whole CNNs (BN gone, outputs match), refusals, low precision."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convert.rewrites import NotApplicable, rewrite
from convert.rewrites.bn_math import bn_affine, fold_bn_conv_weights, fold_conv_bn_weights
from convert.rewrites.fold_batchnorm import fold_batchnorms
from convert.verify import verify
from tests.convert._cnns import (
    PreActHead,
    SharedProducer,
    TinyMobileNet,
    TinyResNet,
    randomize_batchnorms,
)


def _bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _images(n: int = 6, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _folded(model: nn.Module, inputs: dict | None = None) -> tuple[nn.Module, list[str]]:
    new = copy.deepcopy(model)
    return new, fold_batchnorms(new, {"x": _images()} if inputs is None else inputs)


# --- the math, one layer kind at a time, in float64 -------------------------------------------------

POST = [
    pytest.param(lambda: nn.Linear(6, 5), 5, (4, 6), id="linear"),
    pytest.param(lambda: nn.Conv1d(6, 4, 3, groups=2), 4, (2, 6, 9), id="conv1d-groups"),
    pytest.param(lambda: nn.Conv2d(6, 9, 3, groups=3, bias=False), 9, (2, 6, 7, 7), id="conv2d-groups-nobias"),
    pytest.param(lambda: nn.Conv3d(4, 6, 2, groups=2), 6, (2, 4, 4, 4, 4), id="conv3d-groups"),
    pytest.param(lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2), 4, (2, 6, 5), id="convT1d-groups"),
    pytest.param(lambda: nn.ConvTranspose2d(6, 9, 2, stride=2, groups=3, bias=False), 9, (2, 6, 4, 4),
                 id="convT2d-groups-nobias"),
    pytest.param(lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), 6, (2, 4, 3, 3, 3), id="convT3d-groups"),
]
BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # input rank -> BN


@pytest.mark.parametrize("make_layer, channels, shape", POST)
def test_post_position_math_matches_layer_then_bn(make_layer, channels, shape):
    torch.manual_seed(0)
    bn = randomize_batchnorms(BATCHNORMS[len(shape)](channels)).double().eval()
    layer = make_layer().double()
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    w, b = fold_conv_bn_weights(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
        transposed=transposed, groups=getattr(layer, "groups", 1),
    )
    folded = copy.deepcopy(layer)
    folded.weight, folded.bias = nn.Parameter(w), nn.Parameter(b)
    x = torch.randn(shape, dtype=torch.float64)
    expected = bn(layer(x))
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


PRE = [
    pytest.param(lambda: nn.Linear(6, 5), (4, 6), id="linear"),
    pytest.param(lambda: nn.Conv1d(6, 4, 3, groups=2, bias=False), (2, 6, 9), id="conv1d-groups-nobias"),
    pytest.param(lambda: nn.Conv2d(6, 9, 3, stride=2, groups=3), (2, 6, 7, 7), id="conv2d-groups-stride"),
    pytest.param(lambda: nn.Conv3d(4, 6, 2, groups=2, dilation=2), (2, 4, 5, 5, 5), id="conv3d-groups-dilation"),
]


@pytest.mark.parametrize("make_layer, shape", PRE)
def test_pre_position_math_matches_bn_then_layer(make_layer, shape):
    torch.manual_seed(0)
    bn = randomize_batchnorms(BATCHNORMS[len(shape)](shape[1])).double().eval()
    layer = make_layer().double()
    w, b = fold_bn_conv_weights(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
        groups=getattr(layer, "groups", 1),
    )
    folded = copy.deepcopy(layer)
    folded.weight, folded.bias = nn.Parameter(w), nn.Parameter(b)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(folded(x), layer(bn(x)), rtol=0, atol=1e-12)


def test_math_casts_back_to_the_parameter_dtype_and_agrees_with_torch_for_plain_conv():
    conv, bn = nn.Conv2d(3, 4, 3).half(), randomize_batchnorms(nn.BatchNorm2d(4)).eval()
    w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.dtype == b.dtype == torch.float16
    ref_w, ref_b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight.float(), conv.bias.float(), bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    torch.testing.assert_close(w.float(), ref_w.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.float(), ref_b.detach(), rtol=1e-3, atol=1e-3)


def test_bn_affine_without_affine_parameters():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    scale, shift = bn_affine(mean, var, 0.0)
    torch.testing.assert_close(scale, torch.tensor([0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(shift, torch.tensor([-0.5, 4.0], dtype=torch.float64))


# --- whole models: BN gone and outputs match ---------------------------------------------------------

MODELS = {
    "resnet": TinyResNet,
    "mobilenet": TinyMobileNet,
    "preact": PreActHead,
    "preact-reflect": lambda: PreActHead(padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_batchnorm_is_folded_and_outputs_match(name):
    torch.manual_seed(0)
    model = randomize_batchnorms(MODELS[name]()).eval()
    before = _bn_names(model)
    folded, names = _folded(model)
    assert sorted(names) == sorted(before) and names
    assert _bn_names(folded) == []
    assert _bn_names(model) == before  # the copy was folded, not the original
    assert verify(model, folded, _images(), dtype=torch.float32)


@pytest.mark.parametrize("name", MODELS)
def test_float64_fold_meets_the_float64_gate(name):
    torch.manual_seed(0)
    model = randomize_batchnorms(MODELS[name]()).eval().double()
    folded, _ = _folded(model)
    comparison = verify(model, folded, _images(), dtype=torch.float64)
    assert comparison, comparison.summary()
    assert comparison.needed["rel_l2"] < 1e-12


def test_an_unfolded_batchnorm_would_fail_the_gate():
    """The randomised statistics matter: dropping one BN without folding it is caught."""
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyMobileNet()).eval()
    broken = copy.deepcopy(model)
    broken.up[1] = nn.Identity()
    assert not verify(model, broken, _images(), dtype=torch.float32)


def test_folding_creates_biases_for_bias_free_layers():
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet()).eval()
    folded, _ = _folded(model)
    assert model.layer1.conv1.bias is None
    assert folded.layer1.conv1.bias is not None and folded.layer1.conv1.bias.shape == (8,)


def test_a_model_without_batchnorm_returns_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_batchnorms(model) == []  # not even traced: it needs no inputs


def test_rewrite_folded_leaves_its_input_untouched():
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = rewrite(model, "folded", inputs={"x": _images()})
    assert _bn_names(new) == [] and _bn_names(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert verify(model, new, _images())


class _UntraceableParent(nn.Module):
    """A forward with an input check (fx could not trace it; torch.export can): every BatchNorm folds."""

    def __init__(self):
        super().__init__()
        self.body, self.head = TinyResNet(), nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        if x.shape[1] != 3:  # an input check fx cannot trace through
            raise ValueError("expected 3 channels")
        return self.head(self.body(x))


def test_a_shape_check_that_fx_could_not_trace_is_traced_by_torch_export():
    torch.manual_seed(0)
    model = randomize_batchnorms(_UntraceableParent()).eval()
    folded, names = _folded(model)
    assert sorted(names) == sorted(_bn_names(model)) and _bn_names(folded) == []
    assert verify(model, folded, _images())


def test_hugging_face_resnet_folds():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    model = randomize_batchnorms(ResNetForImageClassification(config)).eval()
    folded, names = _folded(model, {"pixel_values": _images(size=32)})
    assert len(names) == 6 and _bn_names(folded) == []
    assert verify(model, folded, {"pixel_values": _images(size=32)})


# --- refusals: named layer and reason; the model is left as it was -----------------------------------

class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


class _BnTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class _TiedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv2.weight = self.conv1.weight

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


class _ConvTwice(nn.Module):
    """`conv` runs twice (before the BatchNorm, or after it with `pre`), or `tied` shares its weight: folding
    would change the other call."""

    def __init__(self, pre: bool = False, tied: bool = False):
        super().__init__()
        self.pre, self.conv, self.bn = pre, nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.tied = nn.Conv2d(3, 3, 1) if tied else None  # a second layer with conv's weight
        if tied:
            self.tied.weight = self.conv.weight

    def forward(self, x):
        other = self.tied(x) if self.tied is not None else self.conv(x)
        return (self.conv(self.bn(x)) if self.pre else self.bn(self.conv(x))) + other


REFUSALS = {
    "training": (lambda: TinyResNet().train(), r"'stem\.1' is in training mode"),
    "second-consumer": (SharedProducer, r"'bn'.*producer 'conv' has a second consumer"),
    "zero-padded-conv": (lambda: PreActHead(padding=1), r"'bn_in'.*consumer 'conv' zero-pads its input"),
    "no-running-stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        r"'1' has track_running_stats=False",
    ),
    "untraceable": (_Untraceable, r"_Untraceable could not be traced with torch\.export"),
    "bn-called-twice": (_BnTwice, r"'bn' is called 2 times"),
    "tied-weights": (_TiedConv, r"'bn'.*producer 'conv1' shares parameters"),
    "producer-called-twice": (_ConvTwice, r"'bn'.*producer 'conv' is called more than once"),
    "consumer-called-twice": (lambda: _ConvTwice(pre=True), r"'bn'.*consumer 'conv' is called more than once"),
    "consumer-tied-weights": (lambda: _ConvTwice(pre=True, tied=True),
                              r"'bn'.*consumer 'conv' shares parameters with another layer"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_with_the_layer_and_the_reason(case):
    make, message = REFUSALS[case]
    model = randomize_batchnorms(make())
    if case != "training":
        model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _bn_names(model)
    with pytest.raises(NotApplicable, match=message):
        images = _images()[:, :1].expand(-1, 4, -1, -1) if case == "tied-weights" else _images()  # 4 channels
        fold_batchnorms(model, {"input" if isinstance(model, nn.Sequential) else "x": images})
    assert _bn_names(model) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --- low precision: the folded model's error stays within the gate of the original's ---------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_low_precision_gate(name, dtype):
    torch.manual_seed(0)
    model = randomize_batchnorms(MODELS[name]()).eval()
    folded, _ = _folded(model)
    comparison = verify(model, folded, _images(n=16), dtype=dtype)
    assert comparison, comparison.summary()
    assert comparison.reference_error > 0 and comparison.candidate_error > 0
