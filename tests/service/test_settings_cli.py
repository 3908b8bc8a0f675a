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
    assert "--shadow-rate / NORMFUSE_SHADOW_RATE = 2.0: " in capsys.readouterr().err


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


def test_unknown_variables_ignore_other_normfuse_settings_read_elsewhere():
    env = {"NORMFUSE_CACHE_DIR": "/tmp/cache", "NORMFUSE_DEVICE": "cuda", "NORMFUSE_TORCH_MODE": "eager"}
    assert cli.unknown_variables(env) == []


def test_each_backend_gets_only_its_own_options(tmp_path):
    from service.repository import backend_options

    common = dict(repo=tmp_path, intra_op_threads=2, device="cpu", torch_mode="eager", ort_providers="cuda,tensorrt")
    assert backend_options(Settings(backend="onnxruntime", **common)) == {
        "intra_op_threads": 2, "providers": ["cuda", "tensorrt"], "allow_spinning": False}
    assert backend_options(Settings(backend="torch", **common)) == {
        "intra_op_threads": 2, "device": "cpu", "mode": "eager"}
    assert backend_options(Settings(backend="tensorrt", precision="fp16", **common)) == {
        "intra_op_threads": 2, "precision": "fp16"}


def test_serve_with_the_torch_backend_and_intra_op_threads(test_repo):
    """`normfuse serve --backend torch --intra-op-threads 1`, in-process: the model.pt variants load and answer."""
    import asyncio

    import httpx
    import numpy as np

    from service.app import create_app
    from tests.service.repo_builder import MODEL, expected

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repo", str(test_repo), "--backend", "torch", "--intra-op-threads", "1",
                              "--torch-mode", "eager", "--device", "cpu"])
    settings = cli.build_settings(args)

    async def main():
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                x = np.arange(8, dtype=np.float32).reshape(2, 4)
                body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                ready = (await c.get(f"/v2/models/{MODEL}/ready")).status_code
                r = await c.post(f"/v2/models/{MODEL}/versions/unfused/infer", json=body)
                meta = (await c.get(f"/v2/models/{MODEL}/config")).json()
                return ready, r, x, meta

    ready, r, x, meta = asyncio.run(main())
    assert ready == 200
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3), expected(x))
    assert meta["platform"] == "pytorch_libtorch" and meta["backend"] == "pytorch"
    assert meta["default_model_filename"] == "model.pt" and meta["instance_group"][0]["kind"] == "KIND_CPU"


def test_grpc_port_defaults_to_tritons_8001_reads_the_environment_and_the_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("NORMFUSE_GRPC_PORT", raising=False)  # tests/conftest.py turns gRPC off for the suite
    assert Settings(repo=tmp_path).grpc_port == 8001
    monkeypatch.setenv("NORMFUSE_GRPC_PORT", "0")  # 0: no gRPC
    assert Settings(repo=tmp_path).grpc_port == 0
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert cli.build_settings(parser.parse_args(["serve", "--repo", str(tmp_path), "--grpc-port", "9101"])).grpc_port == 9101
    with pytest.raises(ValidationError):
        Settings(repo=tmp_path, grpc_port=70000)


def test_a_grpc_port_in_use_stops_the_start_with_a_clear_error(test_repo):
    import asyncio
    import socket

    from service.app import create_app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = create_app(Settings(repo=test_repo, grpc_port=taken.getsockname()[1], warmup_batch_sizes=[]))

        async def start():
            async with app.router.lifespan_context(app):
                pass

        with pytest.raises(RuntimeError, match="gRPC cannot listen on 127.0.0.1:.*--grpc-port"):
            asyncio.run(start())
    assert app.state.ready is False
