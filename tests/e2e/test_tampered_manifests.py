"""Tampered model directories against the real `normfuse serve` process, traced with strace: each refused model
is not ready with its reason in the repository index, the honest one serves, and no file outside a loaded
model's directory is ever opened (the files they point at, in a sibling model or outside the repository, are
never opened, not even to hash them)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from engines.manifest import read_manifest, write_manifest
from tests.process import ROOT, free_port, start, stop
from tests.service.repo_builder import MODEL, build_test_repo, expected

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240),  # ~40 s: the server under strace
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see every file opened")]

# model -> what its refusal says (the reason in the repository index)
REFUSED = {
    "copied": "names the model 'linear', but its directory is 'copied'",
    "escape": "names the model '../linear', but its directory is 'escape'",
    "dotdot": "must be relative to the model's directory",
    "absolute": "must be relative to the model's directory",
    "symlink": "outside the model's directory",
    "manifest-link": "outside the model's directory",
    "tampered": "the manifest expects",
}


def copy_model(repo: Path, name: str, manifest_name: str | None = None) -> Path:
    target = Path(shutil.copytree(repo / MODEL, repo / name))
    write_manifest(target, read_manifest(target).model_copy(update={"name": manifest_name or name}))
    return target


def point_onnx_at(model_dir: Path, path: str) -> None:
    data = json.loads((model_dir / "manifest.json").read_text())
    for variant in data["variants"].values():
        variant["files"]["onnx"]["path"] = path
    (model_dir / "manifest.json").write_text(json.dumps(data))


def build_hostile_repo(root: Path) -> tuple[Path, Path]:
    """REPO with the victim `linear` (never loaded), `honest` (a proper copy) and one model per hole in REFUSED;
    OUTSIDE holds copies of linear's files (same bytes: every sha256 in the manifests still matches)."""
    repo = build_test_repo(root / "repo", broken=False)
    outside = Path(shutil.copytree(repo / MODEL, root / "outside"))
    copy_model(repo, "honest")
    copy_model(repo, "copied", manifest_name=MODEL)
    copy_model(repo, "escape", manifest_name="../linear")
    point_onnx_at(copy_model(repo, "dotdot"), "../linear/unfused/model.onnx")
    point_onnx_at(copy_model(repo, "absolute"), str(outside / "unfused" / "model.onnx"))
    symlink = copy_model(repo, "symlink")
    for variant in ("unfused", "affine"):
        (symlink / variant / "model.onnx").unlink()
        (symlink / variant / "model.onnx").symlink_to(outside / variant / "model.onnx")
    link = copy_model(repo, "manifest-link")
    shutil.copy(link / "manifest.json", outside / "manifest-link.json")
    (link / "manifest.json").unlink()
    (link / "manifest.json").symlink_to(outside / "manifest-link.json")
    tampered = copy_model(repo, "tampered")
    for variant in ("unfused", "affine"):
        (tampered / variant / "model.onnx").write_bytes(b"\0" + (tampered / variant / "model.onnx").read_bytes())
    return repo, outside


def opened_files(trace: Path) -> set[str]:
    """Every regular file (not a directory) the traced processes opened successfully."""
    pattern = re.compile(r'open(?:at2?)?\((?:AT_FDCWD|\d+), "([^"]+)", ([A-Z_|]+)[^)]*\) = \d+')
    return {match.group(1) for line in trace.read_text(errors="replace").splitlines()
            if (match := pattern.search(line)) and "O_DIRECTORY" not in match.group(2)}


def stop_traced(proc) -> None:
    """SIGTERM the server strace runs, then strace: strace only detaches from its tracee on SIGTERM, which would
    leave the server running after the tests (this strace has no --kill-on-exit)."""
    server = [int(pid) for task in Path(f"/proc/{proc.pid}/task").glob("*")
              for pid in (task / "children").read_text().split()] if proc.poll() is None else []
    for pid in server:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)  # strace exits once its tracee has
    stop(proc)
    for pid in server:  # a server that ignored SIGTERM for 30 s (checked to be ours: a pid can be reused)
        with contextlib.suppress(OSError):
            if b"normfuse.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    repo, outside = build_hostile_repo(root)
    port, trace, log = free_port(), root / "strace.log", root / "server.log"
    cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace),
           sys.executable, "-m", "normfuse.cli", "serve", "--repo", str(repo), "--port", str(port),
           "--model-control-mode", "explicit", "--load-model", ",".join(["honest", *REFUSED])]
    proc = start(cmd, ready_url=f"http://127.0.0.1:{port}/v2/health/ready", log_path=log, timeout_s=180)
    try:
        url = f"http://127.0.0.1:{port}"
        index = httpx.post(f"{url}/v2/repository/index", json={}, timeout=30).json()
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        answer = httpx.post(f"{url}/v2/models/honest/infer", json=body, timeout=30)
        refused_ready = {name: httpx.get(f"{url}/v2/models/{name}/ready", timeout=30).status_code
                         for name in REFUSED}
    finally:
        stop_traced(proc)
    return {"repo": repo, "outside": outside, "index": index, "answer": answer, "x": x,
            "refused_ready": refused_ready, "opened": opened_files(trace)}


def test_the_honest_model_serves(traced):
    assert traced["answer"].status_code == 200, traced["answer"].text
    y = np.array(traced["answer"].json()["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_array_equal(y, expected(traced["x"]))
    assert {"name": "honest", "version": "affine", "state": "READY"} in traced["index"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_tampered_model_is_not_ready_with_its_reason(traced, name):
    assert traced["refused_ready"][name] != 200
    rows = [row for row in traced["index"] if row["name"] == name]  # one per variant once the manifest parsed
    assert rows and all(r["state"] == "UNAVAILABLE" and REFUSED[name] in r["reason"] for r in rows), rows


def test_no_file_outside_a_loaded_models_directory_is_ever_opened(traced):
    repo, outside = traced["repo"], traced["outside"]
    opened = traced["opened"]
    assert any(path.startswith(str(repo / "honest")) for path in opened), "the trace saw no model file at all"
    victim = [p for p in opened if p.startswith(str(outside)) or p.startswith(str(repo / MODEL) + "/")]
    assert victim == [], f"opened outside the model directories: {victim}"
    assert not any(p.startswith(str(ROOT)) and p.endswith(".onnx") for p in opened)
