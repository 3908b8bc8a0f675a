"""Peer servers that serve the SAME ONNX file through the same ONNX Runtime engine as normfuse.

Each peer is a module runnable as a process (`python -m benchmarks.peers.<kind> --onnx F --model M --port P`)
speaking OIP v2 at `/v2/models/{M}/infer`; `launch.start(kind, ...)` starts one and waits until it is ready.

- `plain`: a per-request FastAPI endpoint, no batching (what most "N× faster than FastAPI" claims compare to).
- `litserve`: LitServe with its batching (`max_batch_size`, `batch_timeout`), JSON only (LitServe parses
  the body as JSON before its worker process sees it).
- `triton`: NVIDIA Triton (the server bundled in `nvidia-pytriton`) with its dynamic batcher; the engine
  runs in pytriton's Python backend proxy.
"""
