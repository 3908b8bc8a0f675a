"""`normfuse --help` and `normfuse serve --help` as a user runs them: no heavy stack imported, defaults shown,
the required setting marked; invalid settings one line each (flag/variable, value given, what is allowed)."""

import subprocess
import sys

from tests.process import ROOT, normfuse

PROBE = """
import sys
from normfuse.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "onnxruntime", "uvicorn", "transformers", "fastapi") if m in sys.modules)
print("HEAVY", heavy)
"""


def imported_by(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    return result.stdout


def test_top_level_help_lists_every_command_without_importing_any_stage():
    out = imported_by(["--help"])
    for command in ("convert", "serve", "bench", "loadgen", "capacity"):
        assert f"    {command} " in out
    assert "HEAVY []" in out


def test_serve_help_shows_defaults_and_the_required_repo_without_heavy_imports():
    out = imported_by(["serve", "--help"])
    assert "HEAVY []" in out
    text = " ".join(out.split())
    assert "(NORMFUSE_REPO; required)" in text
    assert "(NORMFUSE_MAX_QUEUE_DELAY_MS; default: 0.0)" in text and "(NORMFUSE_MAX_INFLIGHT; default: 64)" in text
    assert "--engine-timeout-s" in text and "(NORMFUSE_PORT; default: 8000)" in text


def test_invalid_settings_one_line_each(tmp_path):
    missing = normfuse("serve")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["normfuse serve: invalid settings:",
                                           "  --repo / NORMFUSE_REPO: required, not given"]
    bad = normfuse("serve", "--repo", str(tmp_path), "--port", "70000", "--max-batch-size", "x")
    lines = bad.stderr.splitlines()
    assert bad.returncode == 2 and len(lines) == 3 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[1].startswith("  --port / NORMFUSE_PORT = 70000: ") and "65535" in lines[1]
    assert lines[2].startswith("  --max-batch-size / NORMFUSE_MAX_BATCH_SIZE = 'x': ") and "integer" in lines[2]


def test_convert_help_without_heavy_imports():
    out = imported_by(["convert", "--help"])
    assert "HEAVY []" in out, out[-2000:]
    assert "--variants" in out and "--repo" in out
