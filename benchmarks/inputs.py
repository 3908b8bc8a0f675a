"""Request inputs for load generation: random tensors that follow a model's OIP tensor metadata.

(The codec that encodes them is `oip.codec`, shared with the server.)
"""

from __future__ import annotations

import numpy as np

from engines.base import numpy_dtype


def random_inputs(specs: list[dict], batch: int, *, seed: int = 0, vocab: int = 1000) -> dict[str, np.ndarray]:
    """Inputs for OIP tensor metadata (`{"name","datatype","shape"}`, -1 = dynamic; axis 0 the batch).

    Floats are standard normal; integers (token ids) are drawn below `vocab`, masks named
    `*mask*` are all ones. Other dynamic axes must be fixed by the caller's specs.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [batch] + [int(d) for d in spec["shape"][1:]]
        if any(d < 0 for d in shape):
            raise ValueError(f"input {spec['name']!r} has a dynamic axis besides the batch: {spec['shape']}")
        dtype = numpy_dtype(spec["datatype"])
        if np.issubdtype(dtype, np.floating):
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in spec["name"]:
            out[spec["name"]] = np.ones(shape, dtype=dtype)
        else:
            out[spec["name"]] = rng.integers(0, vocab, shape).astype(dtype)
    return out
