"""Convert: rewrite a trained model's normalization layers into cheaper exact forms, prove it, export it.

The public names are imported on first use (PEP 562), so `normfuse convert --help` and the other commands that
only register their flags do not pay for importing torch.
"""

import importlib

__all__ = ["EXACT_VARIANTS", "REWRITES", "NotApplicable", "rewrite", "verify"]

_LAZY = {"EXACT_VARIANTS": "convert.rewrites", "REWRITES": "convert.rewrites", "NotApplicable": "convert.rewrites",
         "rewrite": "convert.rewrites", "verify": "convert.verify"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
