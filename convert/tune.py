"""`normfuse tune REPO/NAME`: re-time a converted model's plans on this machine and update its default plan.

Nothing is re-converted or re-gated: the plans, their files and their gate records stay as convert wrote them;
only their timings, the CPU they were timed on and the default change (convert.plan_timing.retime). Plans this CPU
cannot run natively are not timed and cannot become the default. A server polling the repository picks the new
manifest up like any re-conversion.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from convert.cli import positive

    parser = subparsers.add_parser(
        "tune", help="re-time a converted model's plans on this machine and update its default plan",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="REPO/NAME", type=Path, help="the converted model's directory")
    parser.add_argument("--threads", type=positive, default=None, help="engine threads (default: all cores)")
    parser.add_argument("--batch", type=positive, default=8, help="the timed batch (default 8)")
    parser.add_argument("--rounds", type=positive, default=8, help="paired rounds per plan (default 8)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from convert.plan_timing import retime
    from convert.plans import PlanOptions, summary
    from engines.manifest import ManifestError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = PlanOptions(batch=args.batch, rounds=args.rounds, threads=args.threads)  # lossy: as converted
    try:
        manifest = retime(args.model, options)
    except (ManifestError, ValueError) as exc:
        sys.stderr.write(textwrap.fill(f"normfuse tune: error: {exc}", width=100) + "\n")
        return 2
    sys.stdout.write(f"re-timed {args.model}/manifest.json\n" + summary(manifest))
    return 0
