"""Peer 2: LitServe with batching, serving the same engine. OIP v2 JSON only (LitServe parses JSON bodies)."""

from __future__ import annotations

import json

import litserve as ls
import numpy as np

from benchmarks.peers.common import load_engine, parse_args
from oip.codec import encode_outputs, request_from_json


class OnnxAPI(ls.LitAPI):
    """Decode OIP JSON inputs, concatenate a batch of requests, run the engine, split the outputs back."""

    def __init__(self, onnx: str, model: str, threads: int | None, **kwargs) -> None:
        super().__init__(api_path=f"/v2/models/{model}/infer", **kwargs)
        self.onnx, self.model, self.threads = onnx, model, threads

    def setup(self, device) -> None:
        self.engine = load_engine(self.onnx, self.threads)

    def decode_request(self, request: dict) -> dict[str, np.ndarray]:
        return request_from_json(request)[1]  # the server's strict decoder

    def batch(self, inputs: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
        sizes = [next(iter(x.values())).shape[0] for x in inputs]
        return {name: np.concatenate([x[name] for x in inputs]) for name in inputs[0]}, sizes

    def predict(self, batched):
        if isinstance(batched, dict):  # max_batch_size == 1: LitServe skips batch()
            return self.engine.infer(batched)
        inputs, sizes = batched
        outputs = self.engine.infer(inputs)
        bounds = np.cumsum(sizes)[:-1]
        parts = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(sizes))]

    def encode_response(self, outputs: dict[str, np.ndarray]) -> dict:
        return json.loads(encode_outputs(self.model, outputs, binary=False)[0])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    api = OnnxAPI(args.onnx, args.model, args.threads, max_batch_size=args.max_batch_size,
                  batch_timeout=args.max_queue_delay_ms / 1e3)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
