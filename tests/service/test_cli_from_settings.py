"""`normfuse serve`'s flags come from the Settings fields alone (pydantic-settings' CLI source): a field added to
Settings is a flag with nothing else to edit, and every bad value, a bad choice included, is one line."""

import argparse

from service import cli
from service.settings import Settings


def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    cli.register(subparsers)
    return parser, subparsers.choices["serve"]


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    _, serve = serve_parser()
    flags = {action.dest: action.option_strings for action in serve._actions if action.dest != "help"}
    assert set(flags) == set(Settings.model_fields)
    assert all(flags[name] == [cli.flag_of(name)] for name in flags)


def test_flags_not_given_read_none_and_leave_the_environment_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMFUSE_MAX_BATCH_SIZE", "4")
    parser, _ = serve_parser()
    args = parser.parse_args(["serve", "--repo", str(tmp_path)])
    assert args.max_batch_size is None and args.port is None
    settings = cli.build_settings(args)
    assert (settings.max_batch_size, settings.port) == (4, 8000)


def test_a_bad_choice_is_one_line_like_any_other_bad_value(capsys, tmp_path):
    parser, _ = serve_parser()
    args = parser.parse_args(["serve", "--repo", str(tmp_path), "--backend", "onnx", "--log-level", "loud"])
    assert cli.serve(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "normfuse serve: invalid settings:" and len(lines) == 3, lines
    assert lines[1].startswith("  --backend / NORMFUSE_BACKEND = 'onnx': ") and "onnxruntime" in lines[1]
    assert lines[2].startswith("  --log-level / NORMFUSE_LOG_LEVEL = 'loud': ") and "debug" in lines[2]
