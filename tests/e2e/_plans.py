"""vit-digits converted with its OpenVINO plans (bf16 asked for), as the plan e2e tests share it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.process import normfuse


def convert_digits_with_plans(repo: Path, variants: str) -> subprocess.CompletedProcess:
    """`normfuse convert vit-digits --name digits` into `repo` with `variants` and bf16 plans; asserts it worked."""
    result = normfuse("convert", "vit-digits", "--name", "digits", "--repo", str(repo), "--variants", variants,
                      "--samples", "16", "--cpu-precision", "bf16", "--quiet", "--no-torch")
    assert result.returncode == 0, result.stderr[-3000:]
    return result
