"""`normfuse serve`'s real uvicorn server (service.cli.build_server, settings from NORMFUSE_*) around the exact
fake engine (y = 2x + 1), whose runs block while a gate file exists: lets a test hold requests in the queue, or
hang the engine, from outside the process.

    python -m tests.service.gated_server GATE_FILE
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from service.cli import build_server
from service.settings import Settings
from tests.service.fakes import AffineEngine


class GatedEngine(AffineEngine):
    def __init__(self, gate: Path) -> None:
        super().__init__(max_batch_size=None)
        self.gate_file = gate

    def _run(self, inputs):
        while self.gate_file.exists():  # shut: block (a hung engine, if it stays shut)
            time.sleep(0.01)
        return super()._run(inputs)


def main(gate: str) -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    build_server(settings, lambda *args, **options: GatedEngine(Path(gate)).load()).run()


if __name__ == "__main__":
    main(sys.argv[1])
