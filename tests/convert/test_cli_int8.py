"""`normfuse convert` int8 flags: a gate or α outside [0, 1] is a usage error naming the flag; defaults."""

import pytest

from normfuse.cli import build_parser


@pytest.mark.parametrize("flag", ["--int8-min-agreement", "--int8-min-cosine", "--int8-alpha"])
@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_value_outside_the_unit_interval_is_a_usage_error_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["convert", "vit-digits", "--name", "m", "--repo", "r", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "[0, 1]" in err


def test_unknown_smoothing_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "x", "--name", "m", "--repo", "r", "--int8-method", "magic"])
    assert "--int8-method" in capsys.readouterr().err


def test_defaults_and_the_explicit_lossy_default_flag():
    args = build_parser().parse_args(["convert", "x", "--name", "m", "--repo", "r", "--variants", "unfused,int8"])
    assert (args.int8_min_agreement, args.int8_min_cosine, args.int8_alpha) == (0.99, 0.999, 0.5)
    assert args.variants == ["unfused", "int8"] and args.allow_lossy_default is False
    args = build_parser().parse_args(["convert", "x", "--name", "m", "--repo", "r", "--allow-lossy-default"])
    assert args.allow_lossy_default is True
