"""Peer 3: NVIDIA Triton (bundled in nvidia-pytriton) with its dynamic batcher, serving the same engine.

Triton's server process hands batches to this process's Python backend proxy, which runs the engine.
If the model fails to load with `'_thread.RLock' object has no attribute '_recursion_count'`, the
backend stub picked up the system libpython: `launch.start` sets LD_LIBRARY_PATH to this
interpreter's LIBDIR for that reason.
"""

from __future__ import annotations

import numpy as np

from benchmarks.peers.common import load_engine, parse_args


def main(argv: list[str] | None = None) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    args = parse_args(__doc__.splitlines()[0], argv)
    engine = load_engine(args.onnx, args.threads)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return engine.infer(inputs)

    def tensors(specs):
        return [Tensor(name=s.name, dtype=s.dtype.type, shape=tuple(s.shape[1:])) for s in specs]

    delay_us = int(args.max_queue_delay_ms * 1000)
    config = ModelConfig(max_batch_size=args.max_batch_size,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us))
    triton_config = TritonConfig(http_address=args.host, http_port=args.port, grpc_port=args.port + 1,
                                 metrics_port=args.port + 2, log_verbose=0)
    with Triton(config=triton_config) as triton:
        triton.bind(model_name=args.model, infer_func=infer, inputs=tensors(engine.inputs),
                    outputs=tensors(engine.outputs), config=config, strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
