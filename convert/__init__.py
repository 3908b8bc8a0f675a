"""Convert: rewrite a trained model's normalization layers into cheaper exact forms, prove it, export it."""

from convert.rewrites import EXACT_VARIANTS, REWRITES, NotApplicable, rewrite

__all__ = ["EXACT_VARIANTS", "REWRITES", "NotApplicable", "rewrite", "verify"]


def __getattr__(name: str):
    # `convert.verify` is the comparison function of convert/verify.py (imported lazily: it pulls numpy-heavy code)
    if name == "verify":
        from convert.verify import verify

        return verify
    raise AttributeError(name)
