"""Decode time of a 4,096-row JSON inference body (vit-digits' images, 4096 x 8 x 8 FP32, as `bench overload`'s
large clients send), through the codec with orjson (now) and with the standard library's parser (before).

    python tools/json_decode_bench.py [--rows 4096] [--repeat 15]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np
import orjson

from oip.codec import decode_request, encode_request, request_from_json


def median_ms(fns: dict, repeat: int, rounds: int = 2) -> dict[str, float]:
    """Median milliseconds of each function: `rounds` alternating blocks of `repeat` runs each (a busy shared
    machine slows them alike; runs of one function back to back, as a server decodes one kind of body)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeat):
                gc.collect()  # each run starts from the same heap (the previous run's garbage gone)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    images = np.random.default_rng(0).random((args.rows, 8, 8), dtype=np.float32)
    body, _ = encode_request({"images": images}, binary=False)
    ms = median_ms({"parse, stdlib json": lambda: json.loads(body), "parse, orjson": lambda: orjson.loads(body),
                    "decode, stdlib json": lambda: request_from_json(json.loads(body)),
                    "decode, orjson (oip.codec)": lambda: decode_request(body, None)}, args.repeat)
    sys.stdout.write(f"{args.rows}-row JSON body, {len(body) / 1e6:.1f} MB, median of 2 x {args.repeat} runs:\n")
    for name, value in ms.items():
        sys.stdout.write(f"  {name:28s} {value:8.1f} ms\n")


if __name__ == "__main__":
    main()
