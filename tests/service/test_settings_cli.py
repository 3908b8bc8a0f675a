import argparse

import pytest
from pydantic import ValidationError

from service import cli
from service.settings import Settings


def test_environment_and_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMFUSE_REPO", str(tmp_path))
    monkeypatch.setenv("NORMFUSE_PREFERRED_BATCH_SIZES", "8,4")
    monkeypatch.setenv("NORMFUSE_SHADOW_RATE", "0.25")
    s = Settings()
    assert s.repo == tmp_path and s.preferred_batch_sizes == [4, 8] and s.shadow_rate == 0.25
    for bad in ({"shadow_rate": 1.5}, {"max_queue_delay_ms": -1}, {"preferred_batch_sizes": "0"},
                {"max_batch_size": 4, "preferred_batch_sizes": [8]}, {"max_queue_size": 0}, {"bogus": 1},
                {"repo": tmp_path / "missing"}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_cli_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMFUSE_PORT", "9000")
    monkeypatch.setenv("NORMFUSE_SHADOW_RATE", "0.5")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repo", str(tmp_path), "--port", "9100", "--preferred-batch-sizes", "2,4"])
    s = cli.build_settings(args)
    assert (s.port, s.shadow_rate, s.preferred_batch_sizes, s.repo) == (9100, 0.5, [2, 4], tmp_path)
    assert args.handler is cli.serve


def test_serve_refuses_bad_settings_with_exit_code_2(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repo", str(tmp_path), "--shadow-rate", "2"])
    assert cli.serve(args) == 2
    assert "shadow_rate" in capsys.readouterr().err


def test_sigterm_turns_readiness_false_before_uvicorn_shuts_down(tmp_path):
    import signal

    server = cli.build_server(Settings(repo=tmp_path, port=0))
    app = server.config.app
    app.state.ready = True
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.ready is False and server.should_exit


def test_unknown_normfuse_variables_are_reported():
    env = {"NORMFUSE_SHADOW_RATIO": "0.2", "NORMFUSE_SHADOW_RATE": "0.2", "PATH": "/bin"}
    assert cli.unknown_variables(env) == ["NORMFUSE_SHADOW_RATIO"]
