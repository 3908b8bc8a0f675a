"""Model control in-process (ASGI transport, lifespan driven by hand, real ONNX Runtime): the settings and flags,
the refusals (none/poll mode, unknown model, not loaded), the LOADING state while a revision is built, and the
poller's grace for a model directory that goes missing. The real server process: tests/e2e/test_model_control.py.
"""

import argparse
import asyncio
import shutil
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
from pydantic import ValidationError

import engines
from service import cli, control
from service.app import create_app
from service.settings import Settings
from tests.service.repo_builder import BROKEN, MODEL, build_test_repo

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def serving(repo, loader=None, **overrides):
    app = create_app(Settings(repo=repo, **overrides), loader=loader)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, app


def test_settings_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMFUSE_MODEL_CONTROL_MODE", "explicit")
    monkeypatch.setenv("NORMFUSE_LOAD_MODEL", "a, b")
    s = Settings(repo=tmp_path)
    assert (s.model_control_mode, s.load_model, s.repository_poll_secs) == ("explicit", ["a", "b"], 15.0)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--repo", str(tmp_path), "--load-model", "x", "--load-model", "y,z",
                              "--repository-poll-secs", "0.5"])
    s = cli.build_settings(args)
    assert (s.model_control_mode, s.load_model, s.repository_poll_secs) == ("explicit", ["x", "y", "z"], 0.5)
    monkeypatch.delenv("NORMFUSE_LOAD_MODEL")
    monkeypatch.delenv("NORMFUSE_MODEL_CONTROL_MODE")
    for bad in ({"repository_poll_secs": 0}, {"repository_poll_secs": -1}, {"model_control_mode": "sometimes"},
                {"load_model": ["a"]}):  # load_model without explicit mode
        with pytest.raises(ValidationError):
            Settings(repo=tmp_path, **bad)


@pytest.mark.parametrize("flags", [["--repository-poll-secs", "0"], ["--repository-poll-secs", "-2"],
                                   ["--load-model", MODEL]])
def test_bad_control_flags_are_a_usage_error(capsys, tmp_path, flags):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert cli.serve(parser.parse_args(["serve", "--repo", str(tmp_path), *flags])) == 2
    err = capsys.readouterr().err
    assert "--repository-poll-secs / NORMFUSE_REPOSITORY_POLL_SECS" in err or "needs model_control_mode explicit" in err


def test_none_and_poll_mode_refuse_load_and_unload_saying_how(test_repo):
    async def main():
        for mode, how in (("none", "--model-control-mode explicit"), ("poll", "remove the model's directory")):
            async with serving(test_repo, model_control_mode=mode, repository_poll_secs=3600) as (c, _):
                for action in ("load", "unload"):
                    r = await c.post(f"/v2/repository/models/{MODEL}/{action}")
                    assert r.status_code == 400 and how in r.json()["error"] and mode in r.json()["error"]
                assert (await c.get(f"/v2/models/{MODEL}/ready")).status_code == 200  # nothing changed

    asyncio.run(main())


def test_explicit_mode_refusals(test_repo):
    async def main():
        async with serving(test_repo, model_control_mode="explicit") as (c, app):
            r = await c.get("/v2/health/ready")  # explicit, nothing loaded: not ready (issue 22)
            assert r.status_code == 503 and "no model is loaded" in r.json()["error"]
            r = await c.post("/v2/repository/models/nope/load", content=b"")
            assert r.status_code == 404 and str(test_repo) in r.json()["error"] and "nope" in r.json()["error"]
            r = await c.post(f"/v2/repository/models/{MODEL}/unload", json={})
            assert r.status_code == 400 and "not loaded" in r.json()["error"]
            r = await c.post(f"/v2/models/{MODEL}/infer", json={})
            # answered from the loaded set: the repository's unloaded models are not named (issue 22)
            assert r.status_code == 404 and r.json()["error"] == f"unknown model {MODEL!r}; models loaded: none"
            for body in (b"[1]", b"{not json", b'{"parameters": {"config": "{}"}}', b'{"parameters": [1]}'):
                r = await c.post(f"/v2/repository/models/{MODEL}/load", content=body)
                assert r.status_code == 400, body
            assert app.state.repo.models == {}  # none of these loaded anything
            r = await c.post(f"/v2/repository/models/{BROKEN}/load")
            assert r.status_code == 400 and "failed to load" in r.json()["error"]
            metrics = (await c.get("/metrics")).text
            assert f'normfuse_model_load_failures_total{{model="{BROKEN}"}} 1.0' in metrics

    asyncio.run(main())


def test_index_says_loading_while_a_revision_is_built(test_repo):
    release, building = threading.Event(), threading.Event()

    def slow_loader(*args, **kwargs):
        building.set()
        release.wait(30)
        return engines.load(*args, **kwargs)

    async def main():
        async with serving(test_repo, loader=slow_loader, model_control_mode="explicit") as (c, _):
            load = asyncio.ensure_future(c.post(f"/v2/repository/models/{MODEL}/load"))
            await asyncio.to_thread(building.wait, 30)
            rows = (await c.post("/v2/repository/index")).json()
            assert {"name": MODEL, "version": "", "state": "LOADING", "reason": "loading"} in rows
            release.set()
            assert (await load).status_code == 200
            rows = (await c.post("/v2/repository/index", json={"ready": True})).json()
            assert {(r["name"], r["version"], r["state"]) for r in rows} == {
                (MODEL, "unfused", "READY"), (MODEL, "affine", "READY")}

    asyncio.run(main())


def test_poller_unloads_a_vanished_model_only_after_the_grace(tmp_path, monkeypatch):
    repo = build_test_repo(tmp_path / "repo", broken=False)

    async def main():
        async with serving(repo, model_control_mode="poll", repository_poll_secs=3600) as (c, app):
            control_ = app.state.control
            shutil.rmtree(repo / MODEL)
            await control_.scan()  # first sighting of the gap
            await control_.scan()  # within the grace: still served
            assert MODEL in control_.models and (await c.get(f"/v2/models/{MODEL}/ready")).status_code == 200
            monkeypatch.setattr(control, "MISSING_GRACE_S", 0.0)
            await control_.scan()
            assert MODEL not in control_.models
            rows = (await c.post("/v2/repository/index")).json()
            assert rows == [{"name": MODEL, "version": "", "state": "UNAVAILABLE",
                             "reason": f"its directory left the repository {repo}"}]
            build_test_repo(tmp_path / "repo", broken=False)  # converted again: the next scan serves it
            await control_.scan()
            assert (await c.get(f"/v2/models/{MODEL}/ready")).status_code == 200

    asyncio.run(main())


def test_poller_reloads_on_new_artifacts_but_not_on_hidden_markers(tmp_path):
    repo = build_test_repo(tmp_path / "repo", broken=False)

    async def main():
        async with serving(repo, model_control_mode="poll", repository_poll_secs=3600) as (_, app):
            control_ = app.state.control
            first = control_.models[MODEL]
            (repo / MODEL / ".converted").touch()  # the deploy's marker: not an artifact
            await control_.scan()
            assert control_.models[MODEL] is first
            plans = repo / MODEL / "affine" / "tensorrt"
            plans.mkdir()
            (plans / "built-later.plan").write_bytes(b"plan")  # e.g. TensorRT plans built after the manifest
            await control_.scan()
            second = control_.models[MODEL]
            assert second is not first and second.label == first.label and second.ready
            await control_.retired()
            assert first.variants == {}  # the replaced revision was drained and closed

    asyncio.run(main())


def test_explicit_mode_star_loads_every_model(test_repo):
    async def main():
        async with serving(test_repo, model_control_mode="explicit", load_model=["*"]) as (c, app):
            assert sorted(app.state.repo.models) == [BROKEN, MODEL]
            assert (await c.get(f"/v2/models/{MODEL}/ready")).status_code == 200
            r = await c.post(f"/v2/repository/models/{BROKEN}/unload")  # a model that failed can be unloaded
            assert r.status_code == 200 and BROKEN not in app.state.repo.models

    asyncio.run(main())


def engine_threads() -> int:
    return sum(t.name.startswith("engine-") for t in threading.enumerate())


def test_a_failed_reload_keeps_the_old_revision_and_leaves_no_thread_behind(tmp_path):
    repo = build_test_repo(tmp_path / "repo", broken=False)

    async def main():
        async with serving(repo, model_control_mode="explicit", load_model=[MODEL]) as (c, app):
            before, threads = app.state.repo.models[MODEL], engine_threads()
            (repo / MODEL / "affine" / "model.onnx").write_bytes(b"changed after conversion")
            r = await c.post(f"/v2/repository/models/{MODEL}/load")
            assert r.status_code == 400 and "sha256" in r.json()["error"]
            assert app.state.repo.models[MODEL] is before and before.ready  # the old revision serves on
            rows = (await c.post("/v2/repository/index")).json()
            assert all("still serving" in row["reason"] and row["state"] == "READY" for row in rows), rows
            for _ in range(200):  # the discarded revision's engine thread (unfused loaded) exits
                if engine_threads() == threads:
                    break
                await asyncio.sleep(0.01)
            assert engine_threads() == threads

    asyncio.run(main())
