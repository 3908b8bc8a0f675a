"""Decode time of a 4,096-row JSON inference body (vit-digits' images, 4096 x 8 x 8 FP32, as `bench overload`'s
large clients send): the JSON parse alone (standard library vs orjson), and the whole decode of this checkout's
`oip.codec` against the same codec at an earlier commit (`--before`, read with `git show`).

    python -m tools.json_decode_bench [--rows 4096] [--repeat 7] [--before 2f0a46d]

Run it as a module from the repository root, so that `oip` is this checkout's (a script's directory would come
first on sys.path, and an installed normfuse could answer instead).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from oip.codec import decode_request, encode_request

ROOT = Path(__file__).resolve().parents[1]


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


def codec_at(commit: str):
    """oip/codec.py as it was at `commit`, imported as a module of its own (it imports `oip.schema` and
    `engines.base`, which are this checkout's)."""
    source = subprocess.run(["git", "show", f"{commit}:oip/codec.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "codec_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("codec_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--before", default="2f0a46d", help="the commit whose codec is 'before' (stdlib json)")
    args = parser.parse_args()
    images = np.random.default_rng(0).random((args.rows, 8, 8), dtype=np.float32)
    body, _ = encode_request({"images": images}, binary=False)
    before = codec_at(args.before)
    ms = median_ms({"parse, stdlib json": lambda: json.loads(body), "parse, orjson": lambda: orjson.loads(body),
                    f"decode, oip.codec at {args.before}": lambda: before.decode_request(body, None),
                    "decode, oip.codec now": lambda: decode_request(body, None)}, args.repeat)
    sys.stdout.write(f"{args.rows}-row JSON body, {len(body) / 1e6:.1f} MB, median of 2 x {args.repeat} runs:\n")
    for name, value in ms.items():
        sys.stdout.write(f"  {name:32s} {value:8.1f} ms\n")


if __name__ == "__main__":
    main()
