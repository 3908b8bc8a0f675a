"""A 6 KB request cannot make the server build a multi-gigabyte answer (issue 22): a tiny random-weight GPT-2 (2
layers, vocab 50257, 1024 positions) converted with `normfuse convert` and served by `normfuse serve`; `input_ids`
[1, 1024] with the default JSON output would be 206 MB of logits, ~4.6 GB of Python floats and JSON text. It is
refused 413 before compute, naming the output, its shape, its size as JSON and the limit, and the server's
resident memory (measured, not timed) grows by less than 100 MiB."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.process import normfuse
from tests.service.server_process import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
VOCAB, POSITIONS = 50257, 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def gpt2_repo(work: Path, positions: int = POSITIONS) -> Path:
    """WORK/repo holding `gpt`: a random-weight GPT-2 (2 layers, width 16, vocab 50257, `positions` positions)
    converted by the real `normfuse convert` (unfused only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = work / "gpt2-shaped"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=positions)
                    ).save_pretrained(directory, safe_serialization=True)
    repo = work / "repo"
    result = normfuse("convert", str(directory), "--name", "gpt", "--repo", str(repo), "--variants", "unfused",
                      "--samples", "2", "--no-benchmark", "--no-torch", "--quiet")
    if result.returncode != 0:
        raise RuntimeError(f"normfuse convert failed:\n{result.stderr[-3000:]}")
    return repo


def ask_for_every_logit(url: str, pid: int, tokens: int = POSITIONS) -> dict:
    """Warm up with 4 tokens, then ask `gpt` for the logits of `tokens` tokens as JSON (the default encoding):
    the answer's status and error, the seconds it took, the server's RSS before and after (bytes)."""
    body = {"inputs": [{"name": "input_ids", "shape": [1, tokens], "datatype": "INT64", "data": [464] * tokens},
                       {"name": "attention_mask", "shape": [1, tokens], "datatype": "INT64", "data": [1] * tokens}]}
    with httpx.Client(base_url=url, timeout=120) as c:
        warm = c.post("/v2/models/gpt/infer", json={**body, "inputs": [
            {**i, "shape": [1, 4], "data": i["data"][:4]} for i in body["inputs"]]})
        if warm.status_code != 200:
            raise RuntimeError(f"the warm-up request failed: {warm.status_code} {warm.text[:300]}")
        before = rss_bytes(pid)
        started = time.perf_counter()
        r = c.post("/v2/models/gpt/infer", json=body)
        seconds = time.perf_counter() - started
        after = rss_bytes(pid)
    return {"status": r.status_code, "error": r.json().get("error", "") if r.status_code != 200 else "",
            "seconds": seconds, "rss_before": before, "rss_after": after}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(gpt2_repo(tmp_path_factory.mktemp("lm")))
    yield srv
    srv.stop()


def test_a_1024_token_json_answer_is_refused_without_the_memory(server):
    asked = ask_for_every_logit(server.url, server.proc.pid)
    assert asked["status"] == 413, asked
    error = asked["error"]
    assert "'logits'" in error and f"[1, {POSITIONS}, {VOCAB}]" in error and "as JSON" in error and "binary" in error
    before, after = asked["rss_before"], asked["rss_after"]
    assert after - before < 100 << 20, (before, after)
    # the figures docs/serving.md quotes (`pytest -s`); the time is not asserted (a shared machine)
    print(f"large answer: refused in {asked['seconds']:.3f} s, RSS {before / 2**20:.0f} -> "  # noqa: T201
          f"{after / 2**20:.0f} MiB")
