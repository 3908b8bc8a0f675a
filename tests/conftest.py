"""Test-wide setup."""

import os

# Servers the tests start (in-process, or as processes that inherit this environment) must not all bind Triton's
# fixed gRPC port 8001, where parallel runs would collide: gRPC is off unless a test gives a free port
# (tests/e2e/test_grpc.py). The default itself (8001) is tested in tests/service/test_settings_cli.py.
os.environ.setdefault("NORMFUSE_GRPC_PORT", "0")
