"""Model control against the real `normfuse serve` process with Triton's own client: explicit load/unload, poll
mode swapping in a re-conversion under concurrent load without a failed request, a broken re-conversion leaving
the old revision serving, 20 swaps without memory growth, and SIGTERM during a swap."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from convert.staging import move_into_place
from engines.manifest import read_manifest, write_manifest
from tests.service.repo_builder import BROKEN, MODEL, build_test_repo, expected
from tests.service.server_process import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def reconvert(repo: Path, corrupt: bool = False) -> None:
    """A re-conversion of MODEL the way `normfuse convert` lands one: a complete copy (of the pristine conversion
    kept in REPO/../pristine) staged in a hidden directory beside it, with a new manifest (new created_at), then
    moved into place in one step."""
    source = repo.parent / "pristine" / MODEL
    if not source.is_dir():
        build_test_repo(source.parent, broken=False)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL}.partial-", dir=repo))
    for path in source.rglob("*"):
        if path.is_file():
            target = staging / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    manifest = read_manifest(staging)
    write_manifest(staging, manifest.model_copy(update={"created_at": datetime.now(timezone.utc)}))
    if corrupt:  # an artifact that no longer matches its manifest's sha256
        (staging / "affine" / "model.onnx").write_bytes(b"not the converted model")
    move_into_place(staging, repo / MODEL)


def revision(url: str) -> str:
    return httpx.get(f"{url}/v2/models/{MODEL}/config", timeout=10).json()["parameters"]["revision"]["string_value"]


def metric(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def infer_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


REVISIONS = f'normfuse_model_revisions{{model="{MODEL}"}}'


def test_explicit_load_and_unload_with_tritonclient(tmp_path):
    import tritonclient.http as triton

    repo = build_test_repo(tmp_path / "repo")
    srv = Server(repo, "--model-control-mode", "explicit", "--load-model", MODEL)
    try:
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        index = client.get_model_repository_index()
        assert {"name": MODEL, "version": "affine", "state": "READY"} in index
        assert {"name": BROKEN, "version": "", "state": "UNAVAILABLE",
                "reason": f"load it with POST /v2/repository/models/{BROKEN}/load"} in index
        first = revision(srv.url)
        assert first.endswith(read_manifest_sha(repo)[:12])
        assert f'revision="{first}"' in httpx.get(f"{srv.url}/metrics").text  # normfuse_engine info

        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        assert {"name": MODEL, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"} in \
            client.get_model_repository_index()
        with pytest.raises(triton.InferenceServerException, match="not loaded") as unload_again:
            client.unload_model(MODEL)
        assert unload_again.value.status() == "400"
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL) and revision(srv.url) == first
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = triton.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(MODEL, [inp]).as_numpy("y"), expected(x))

        with pytest.raises(triton.InferenceServerException, match="model repository") as unknown:
            client.load_model("nope")
        assert unknown.value.status() == "404" and str(repo) in unknown.value.message()
        with pytest.raises(triton.InferenceServerException, match="failed to load") as broken:
            client.load_model(BROKEN)
        assert broken.value.status() == "400" and "protobuf parsing failed" in broken.value.message().lower()
        assert metric(srv.url, f'normfuse_model_load_failures_total{{model="{BROKEN}"}}') == 1
        client.close()
    finally:
        srv.stop()


def read_manifest_sha(repo: Path) -> str:
    from engines.manifest import manifest_sha256

    return manifest_sha256(repo / MODEL)


class Traffic:
    """`workers` threads each sending requests in a loop (bounded) and checking every answer exactly."""

    def __init__(self, url: str, workers: int = 4, limit: int = 3000) -> None:
        self.url, self.limit, self.stop = url, limit, threading.Event()
        self.done = [0] * workers
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set() and self.done[i] < self.limit:
                x = np.full((1 + i % 3, 4), self.done[i] % 7 + i, np.float32)
                try:
                    r = c.post(f"/v2/models/{MODEL}/infer", json=infer_body(x))
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text}")
                    elif not np.array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                            expected(x).reshape(-1)):
                        self.failures.append(f"wrong answer {r.text}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.done[i] += 1

    def finish(self) -> int:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return sum(self.done)


@pytest.fixture(scope="module")
def poll_server(tmp_path_factory):
    repo = build_test_repo(tmp_path_factory.mktemp("poll") / "repo", broken=False)
    srv = Server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    srv.repo = repo
    yield srv
    srv.stop()


def test_poll_mode_swaps_a_reconversion_under_load_without_a_failed_request(poll_server):
    srv = poll_server
    before = revision(srv.url)
    traffic = Traffic(srv.url)
    wait_for(lambda: min(traffic.done) >= 10, "traffic to start")
    reconvert(srv.repo)
    wait_for(lambda: revision(srv.url) != before, "the poller to swap in the re-conversion")
    seen = list(traffic.done)
    wait_for(lambda: all(d >= s + 10 for d, s in zip(traffic.done, seen, strict=True)), "traffic on the new revision")
    sent = traffic.finish()
    assert traffic.failures == [], traffic.failures[:5]
    assert sent >= 80
    after = revision(srv.url)
    assert after.endswith(read_manifest_sha(srv.repo)[:12])
    wait_for(lambda: metric(srv.url, REVISIONS) == 1, "the old revision to close")
    assert f"revision {before} closed" in srv.output()


def test_a_broken_reconversion_leaves_the_old_revision_serving(poll_server):
    import tritonclient.http as triton

    srv = poll_server
    before = revision(srv.url)
    failures = f'normfuse_model_load_failures_total{{model="{MODEL}"}}'
    reconvert(srv.repo, corrupt=True)
    client = triton.InferenceServerClient(srv.url.removeprefix("http://"))

    def reasons() -> list[str]:
        return [row.get("reason", "") for row in client.get_model_repository_index() if row["name"] == MODEL]

    wait_for(lambda: any("failed to load" in r for r in reasons()), "the failed load in the index")
    assert all("sha256" in r and f"revision {before} still serving" in r for r in reasons()), reasons()
    assert client.is_model_ready(MODEL) and revision(srv.url) == before
    x = np.ones((3, 4), np.float32)
    inp = triton.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer(MODEL, [inp]).as_numpy("y"), expected(x))
    assert metric(srv.url, failures) == 1
    assert "failed to load" in srv.output() and "was modified after conversion" in srv.output()
    time.sleep(1.0)  # several scans: the same broken revision is not retried
    assert metric(srv.url, failures) == 1
    reconvert(srv.repo)  # a good conversion replaces it
    wait_for(lambda: revision(srv.url) != before, "the fixed re-conversion")
    assert reasons() == ["", ""]  # the failure is forgotten once a good revision serves
    client.close()


def test_twenty_swaps_do_not_grow_memory(tmp_path):
    import tritonclient.http as triton

    repo = build_test_repo(tmp_path / "repo", broken=False)
    srv = Server(repo, "--model-control-mode", "explicit", "--load-model", MODEL)
    rss = []
    try:
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        x = np.ones((4, 4), np.float32)
        inp = triton.InferInput("x", [4, 4], "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(25):
            client.load_model(MODEL)  # a reload: the zero-downtime swap
            for _ in range(5):
                np.testing.assert_array_equal(client.infer(MODEL, [inp]).as_numpy("y"), expected(x))
            wait_for(lambda: metric(srv.url, REVISIONS) == 1, "the replaced revision to close")
            rss.append(metric(srv.url, "process_resident_memory_bytes"))
        client.close()
    finally:
        srv.stop()
    # the first swaps settle allocator pools; then 20 more must not grow memory beyond noise. Measured here: 0.1 MiB
    # over 20 swaps; with each replaced revision kept instead of closed (a leak), +0.38 MiB per swap of this tiny
    # model, 7.6 MiB over 20 -- well over the bound.
    growth = rss[-1] - rss[4]
    assert growth < 3 * 2**20, [round(r / 2**20, 1) for r in rss]


def test_sigterm_during_a_swap_answers_every_accepted_request(tmp_path):
    repo = build_test_repo(tmp_path / "repo", broken=False)
    # a long batching window holds the requests in the old revision's queue while the new one is swapped in
    srv = Server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2",
                 "--max-queue-delay-ms", "8000", "--max-batch-size", "8")
    xs = [np.full((1, 4), i, np.float32) for i in range(6)]
    results: list[object] = [None] * len(xs)

    def call(i: int) -> None:
        try:
            results[i] = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=infer_body(xs[i]), timeout=60)
        except httpx.HTTPError as exc:
            results[i] = exc

    try:
        before = revision(srv.url)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        wait_for(lambda: metric(srv.url, "normfuse_inflight_requests{") == len(xs), "the requests to be queued")
        reconvert(repo)
        wait_for(lambda: revision(srv.url) != before, "the swap")
        assert metric(srv.url, REVISIONS) == 2, "the old revision should still hold the queued requests"
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = srv.proc.wait(60)
    finally:
        srv.stop()
    lost = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert lost == [], srv.output()[-3000:]
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32), expected(x)[0])
    assert code in (0, -signal.SIGTERM), srv.output()[-3000:]
    assert f"revision {before} closed" in srv.output()
