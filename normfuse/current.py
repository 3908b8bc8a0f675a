"""`python -m normfuse.current REPO/NAME SOURCE`: exit 0 when the conversion in REPO/NAME can be served as it is,
so `make run` reuses it instead of converting again; otherwise print why and exit 1.

Current means: the manifest reads under this schema, was converted from SOURCE by the same versions of the
tools now installed (python, torch, onnx, onnxruntime, transformers, numpy, normfuse), and every servable
variant's files still match their sha256. A change to normfuse's own code without a version bump is not
detected: `make clean` (or `normfuse convert`) converts again.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path


def stale_reasons(model_dir: Path, source: str) -> list[str]:
    from engines.manifest import ManifestError, read_manifest, verify_files

    try:
        manifest = read_manifest(model_dir)
    except ManifestError as exc:
        return [str(exc).splitlines()[0]]
    reasons = [] if manifest.source == source else [f"converted from {manifest.source!r}, not {source!r}"]
    for package, version in manifest.tools.items():
        installed = _installed(package)
        if installed != version:
            reasons.append(f"converted with {package} {version}, {installed or 'nothing'} installed now")
    for name in manifest.servable():
        try:
            verify_files(model_dir, manifest.variants[name])
        except ManifestError as exc:
            reasons.append(str(exc).splitlines()[0])
    return reasons


def _installed(package: str) -> str | None:
    if package == "python":
        return platform.python_version()
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    model_dir, source = Path(argv[0]), argv[1]
    reasons = stale_reasons(model_dir, source)
    for reason in reasons:
        sys.stdout.write(f"{model_dir}: converting again: {reason}\n")
    if not reasons:
        sys.stdout.write(f"{model_dir}: current (same source, tools and files); not converting again\n")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
