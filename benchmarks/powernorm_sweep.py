"""PowerNorm recipes on vit-digits (issue 21: the trained-in norms table's PN demo scores well below LN).

    python -m benchmarks.powernorm_sweep ref af1wu500 ...   # one training run per recipe; prints Markdown rows

Each recipe trains `vit-digits-pn` from scratch with `convert.models.vit_digits.train` (same split, recipe and
seed as the shipped model; nothing is cached or shipped) with some PowerNorm hyper-parameters or the warm-up or
learning rate changed, and prints its test accuracy. Results and reading: docs/un-powernorm.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from convert.models import norms
from convert.models import vit_digits as vd

RECIPES: dict[str, tuple[str, dict, dict, dict]] = {  # name -> (label, ViTConfig, TrainRecipe, PowerNorm changes)
    "ref": ("reference defaults (warm-up 250, α_f = α_b = 0.9, G = heads, lr 3e-3)", {}, {}, {}),
    "g1": ("group_num 1", {}, {}, {"group_num": 1}),
    "lr1": ("lr 1e-3", {}, {"lr": 1e-3}, {}),
    "ab0": ("α_b = 0", {}, {}, {"alpha_bkw": 0.0}),
    "wu500": ("warm-up 500", {"norm_warmup_iters": 500}, {}, {}),
    "wuall": ("warm-up = whole run (batch statistics throughout)", {"norm_warmup_iters": 2000}, {}, {}),
    "af1": ("α_f = 0.1 (UN's working momentum)", {}, {}, {"alpha_fwd": 0.1}),
    "af1wu500": ("α_f = 0.1, warm-up 500", {"norm_warmup_iters": 500}, {}, {"alpha_fwd": 0.1}),
    "af1wu1000": ("α_f = 0.1, warm-up 1000", {"norm_warmup_iters": 1000}, {}, {"alpha_fwd": 0.1}),
    "af1wuall": ("α_f = 0.1, warm-up = whole run", {"norm_warmup_iters": 2000}, {}, {"alpha_fwd": 0.1}),
}


def train_with(config_changes: dict, recipe_changes: dict, norm_changes: dict) -> float:
    """Test accuracy of vit-digits-pn trained with the changes (PowerNorm's constructor defaults overridden)."""
    base = norms.PowerNorm

    class Changed(base):
        def __init__(self, channels: int, **kwargs) -> None:
            super().__init__(channels, **(kwargs | norm_changes))

    norms.PowerNorm = Changed  # make_norm imports it at call time
    try:
        model = vd.train(replace(vd.ViTConfig(), norm="power", **config_changes),
                         replace(vd.TrainRecipe(), **recipe_changes))
    finally:
        norms.PowerNorm = base
    _, x_test, _, y_test = vd.digits_split()
    return vd.accuracy(model, x_test, y_test)


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    for name in names or list(RECIPES):
        label, config, recipe, norm = RECIPES[name]
        start = time.perf_counter()
        accuracy = train_with(config, recipe, norm)
        print(f"| PN, {label} | {accuracy:.4f} | {time.perf_counter() - start:.0f} s |", flush=True)  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
