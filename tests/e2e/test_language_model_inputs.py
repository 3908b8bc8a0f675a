"""A converted language model (a tiny GPT-2 saved as a Hugging Face directory, converted with `normfuse convert`)
served by `normfuse serve`: a token id past the vocabulary, a negative one, a sequence longer than the positions,
an attention mask of another shape, an empty sequence -> 400 naming the input, the value and the limit; never a
500, nothing logged as an error; a good request still answers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from tests.process import normfuse
from tests.service.server_process import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
VOCAB, POSITIONS = 97, 48


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS)
                    ).save_pretrained(directory, safe_serialization=True)
    repo = tmp_path_factory.mktemp("lm") / "repo"
    result = normfuse("convert", str(directory), "--name", "gpt", "--repo", str(repo), "--variants", "unfused",
                      "--samples", "4", "--no-benchmark", "--no-torch", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    srv = Server(repo)
    yield srv
    srv.stop()


def infer(srv, ids, mask=None):
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    body = {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
                       {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64",
                        "data": mask.ravel().tolist()}]}
    return httpx.post(f"{srv.url}/v2/models/gpt/infer", json=body, timeout=60)


@pytest.mark.parametrize(("ids", "mask", "needles"), [
    ([[5, VOCAB + 3]], None, ["'input_ids'", f"value {VOCAB + 3}", f"[0, {VOCAB - 1}]", f"vocab_size = {VOCAB}"]),
    ([[5, -1]], None, ["'input_ids'", "value -1", f"[0, {VOCAB - 1}]"]),
    (np.ones((1, POSITIONS + 1)), None, ["'input_ids'", f"dimension 1 is {POSITIONS + 1}", f"at most {POSITIONS}"]),
    ([[1, 2, 3]], [[1, 1]], ["'attention_mask'", "[1, 2]", "'input_ids'", "[1, 3]"]),
    (np.ones((1, 0)), np.ones((1, 0)), ["'input_ids'", "dimension 1 is 0", "at least 1"]),
], ids=["past-vocabulary", "negative", "too-long", "mask-shape", "empty"])
def test_bad_values_are_400_naming_input_value_and_limit(server, ids, mask, needles):
    r = infer(server, ids, mask)
    assert r.status_code == 400, r.text
    for needle in needles:
        assert needle in r.json()["error"], r.json()["error"]


def test_a_good_request_answers_and_nothing_was_logged_as_an_error(server):
    r = infer(server, [[1, 2, 3, 4]])
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 4, VOCAB]
    log = server.output()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
