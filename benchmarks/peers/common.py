"""What every peer shares: the engine it serves, its command line, and OIP tensor metadata."""

from __future__ import annotations

import argparse
import logging
import os

from engines.onnxruntime import OnnxRuntimeEngine


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--onnx", required=True, help="the ONNX file to serve")
    parser.add_argument("--model", required=True, help="model name in the URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("NORMFUSE_INTRA_OP_THREADS", "0")) or None,
                        help="ONNX Runtime intra-op threads (default: ORT's choice)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args


def load_engine(path: str, threads: int | None) -> OnnxRuntimeEngine:
    """The engine normfuse itself serves, with the same options (ORT_ENABLE_ALL, CPU provider)."""
    return OnnxRuntimeEngine(path, intra_op_threads=threads).load()


def metadata(model: str, engine: OnnxRuntimeEngine) -> dict:
    def md(specs):
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"name": model, "platform": "onnxruntime_onnx", "inputs": md(engine.inputs), "outputs": md(engine.outputs)}
