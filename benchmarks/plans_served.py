"""The served figures beside the plans table: `normfuse serve` at its defaults, c=1 and c=32, against the raw engine.

One server process with its default settings serves MODEL's default plan (the manifest's default variant, ONNX
Runtime); `benchmarks.grpc_bench` drives it over REST binary and gRPC in interleaved rounds (no Triton). The raw
engine is the same variant's `OnnxRuntimeEngine` in this process at batch 1 and at the server's max batch size
(`benchmarks.serving_bench.raw_engine`): served req/s at c=32 ÷ the engine's items/s at that batch size is the
share of the engine's throughput the server delivers.
"""

from __future__ import annotations

import time
from pathlib import Path


def measure(repo: Path, model: str, log_dir: Path, *, rounds: int = 2, step_seconds: float = 8.0) -> dict:
    import engines
    from benchmarks.engines_bench import input_specs
    from benchmarks.grpc_bench import GrpcBenchConfig
    from benchmarks.grpc_bench import run as grpc_run
    from benchmarks.serving_bench import ServingBenchConfig, raw_engine

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    served = grpc_run(Path(repo), GrpcBenchConfig(model=model, rounds=rounds, step_seconds=step_seconds,
                                                  triton=False, log_dir=log_dir))
    manifest, _ = engines.open_model(Path(repo), model)
    batch = int(served["server_settings"]["max_batch_size"])
    engine = raw_engine(Path(repo), ServingBenchConfig(model=model, variant=served["variant"], batch_sizes=(1, batch),
                                                       engine_rounds=10), input_specs(manifest, 128))
    return {"started": started, "model": model, "variant": served["variant"],
            "server_settings": served["server_settings"], "summary": served["summary"], "engine": engine,
            "rounds": rounds, "step_seconds": step_seconds}


def rows(served: dict) -> list[list]:
    """[target, concurrency, p50 ms, req/s, ÷ engine] rows for the report."""
    engine = {r["batch"]: r for r in served["engine"]}
    batch = int(served["server_settings"]["max_batch_size"])
    out = [["raw engine, batch 1", "–", f"{engine[1]['p50_ms']:.1f}", f"{engine[1]['items_per_s']:.2f} items/s", "1.00"],
           [f"raw engine, batch {batch}", "–", f"{engine[batch]['p50_ms']:.1f}",
            f"{engine[batch]['items_per_s']:.2f} items/s", "1.00"]]
    for level, summary in sorted(served["summary"].items(), key=lambda kv: int(kv[0])):
        ref = engine[1] if int(level) == 1 else engine[batch]
        for label, m in summary["medians"].items():
            out.append([label, level, f"{m['p50_ms']:.1f}", f"{m['throughput_rps']:.2f} req/s",
                        f"{m['throughput_rps'] / ref['items_per_s']:.2f}"])
    return out
