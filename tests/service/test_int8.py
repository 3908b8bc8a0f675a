"""A real int8 conversion served as a version: metadata/config say it is not exact, shadow runs against unfused
move `normfuse_shadow_agreement`, and /compare shows the agreement beside the accuracy record."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convert.pipeline import ConvertOptions, convert
from convert.quantize import Int8Options
from tests.convert.test_quantize import PATCH_DIM, PATCHES, source
from tests.service.test_app import serving

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny-vit"


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("int8repo")
    options = ConvertOptions(variants=["unfused", "int8"], samples=8, benchmark=False, torch_artifacts=False,
                             progress=False, int8=Int8Options(eval_samples=32))
    manifest = convert(source(), MODEL, repo, options)
    assert manifest.variants["int8"].servable, manifest.variants["int8"].accuracy
    return repo


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def agreement_samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "normfuse_shadow_agreement":
            for s in family.samples:
                if s.name.endswith(("_count", "_sum")) and s.labels.get("variant") == "int8":
                    out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def test_int8_is_served_as_a_version_and_watched_by_the_shadow_agreement(int8_repo):
    async def main():
        async with serving(int8_repo, shadow_rate=1.0, max_queue_delay_ms=1) as (client, _app):
            meta = (await client.get(f"/v2/models/{MODEL}/versions/int8")).json()
            config = (await client.get(f"/v2/models/{MODEL}/versions/int8/config")).json()
            default = (await client.get(f"/v2/models/{MODEL}")).json()
            x = np.random.default_rng(11).standard_normal((4, PATCHES, PATCH_DIM)).astype(np.float32)
            for _ in range(6):
                response = await client.post(f"/v2/models/{MODEL}/versions/int8/infer", json=body(x))
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.05)  # let the shadow run of this batch finish on the idle unfused batcher
            metrics = (await client.get("/metrics")).text
            compare = (await client.get(f"/v2/models/{MODEL}/compare")).json()
            return meta, config, default, metrics, compare

    meta, config, default, metrics, compare = asyncio.run(main())
    assert "int8" in meta["versions"] and meta["parameters"] == {"variant": "int8", "exact": False}
    assert default["parameters"]["exact"] is True  # the default stays the exact unfused variant
    assert config["parameters"]["exact"]["string_value"] == "false"
    counts = agreement_samples(metrics)
    assert counts["count"] >= 1 and 0 < counts["sum"] <= counts["count"]
    int8 = compare["variants"]["int8"]
    assert int8["exact"] is False and int8["accuracy"]["passed"] is True
    assert int8["shadow"]["pairs"] >= 1 and 0.0 <= int8["shadow"]["agreement_min"] <= int8["shadow"]["agreement_mean"] <= 1.0
    assert compare["variants"]["unfused"]["exact"] is True and compare["variants"]["unfused"]["accuracy"] is None
