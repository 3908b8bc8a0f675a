"""`normfuse bench hostile`: issue 22's hostile and careless clients, measured in the scenarios its tests run,
each against a real server process on loopback, with the tests' own helpers (so the figures and the tests
cannot drift apart):

1. **Slow uploads held** (tests/e2e/test_slow_uploads.py): `tricklers` raw-socket connections announce
   `Content-Length: 1000000` and send a byte every 2 s; once all are connected, `normal` requests are sent one
   after another. Run with the test's settings (no minimum rate, `body_timeout_s` 10: the tricklers hold their
   connections while the normal requests go) and, unless --quick, with the defaults (the minimum rate cuts
   them after their first second). Counted: the normal requests' statuses, what each trickler got.
2. **The largest answer refused** (tests/e2e/test_large_answer.py): a random-weight GPT-2 (vocab 50257)
   converted by `normfuse convert`, asked for the logits of `positions` tokens as JSON: the answer, the time to
   it, the server's RSS before and after.
3. **Bad inputs tried** (tests/e2e/test_fuzz.py): hypothesis's malformed REST and gRPC requests, derandomized,
   to one server: every status seen, every 5xx / INTERNAL / UNKNOWN kept, CPU seconds on each side, and a
   normal request afterwards.

It needs a source checkout (it imports tests/) and the test extra (hypothesis, tritonclient[grpc]). The section
is rendered by benchmarks/hostile_report.py into BENCHMARKS.md between its markers; the raw results go to
benchmarks/results/hostile.json.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("slow-uploads", "large-answer", "fuzz")


@dataclass(frozen=True)
class HostileConfig:
    tricklers: int = 100      # the 100 slow uploads
    normal: int = 40          # normal requests sent while they trickle
    positions: int = 1024     # tokens of the large answer (the issue's [1, 1024] input_ids)
    rest_cases: int = 7_000   # fuzzed REST requests (the test's counts: >= 10,000 in all)
    grpc_cases: int = 3_500
    defaults_run: bool = True  # slow uploads at the default settings too
    scenarios: tuple[str, ...] = SCENARIOS
    work: Path = field(default=Path(".bench/hostile"))


QUICK = {"tricklers": 10, "normal": 5, "positions": 64, "rest_cases": 150, "grpc_cases": 50, "defaults_run": False}


def register(modes) -> None:
    """`normfuse bench hostile` (benchmarks/cli.py calls this)."""
    p = modes.add_parser("hostile", help="slow uploads, the largest answer and 10,500 malformed requests against "
                         "the real server, as issue 22's tests run them; writes BENCHMARKS.md's section")
    p.add_argument("--scenarios", type=lambda t: tuple(x for x in t.split(",") if x), default=SCENARIOS,
                   help=f"comma list of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny counts (10 tricklers, 200 fuzzed requests, 64 "
                   "tokens): a smoke run, not numbers")
    p.add_argument("--work", type=Path, default=Path(".bench/hostile"), help="repositories and server logs")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/hostile.json"),
                   help="results file: written when measuring, read with --report-only")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report to update")
    p.add_argument("--report-only", action="store_true", help="re-render the section from --json")
    p.set_defaults(handler=run_command)


def run_command(args) -> int:
    from benchmarks import hostile_report

    if not args.report_only:
        unknown = set(args.scenarios) - set(SCENARIOS)
        if unknown:
            sys.stderr.write(f"normfuse bench hostile: unknown scenario(s) {sorted(unknown)}; "
                             f"choose from {', '.join(SCENARIOS)}\n")
            return 2
        config = HostileConfig(scenarios=args.scenarios, work=args.work)
        result = run(replace(config, **QUICK) if args.quick else config)
        result["quick"] = args.quick
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not args.json.is_file():
        sys.stderr.write(f"normfuse bench hostile: no results at {args.json}; run it without --report-only\n")
        return 2
    hostile_report.write(args.out, json.loads(args.json.read_text()))
    sys.stdout.write(f"wrote the hostile-clients section of {args.out}\n")
    return 0


def run(config: HostileConfig) -> dict:
    """Every scenario in `config.scenarios`, one server process each; the machine and load around them."""
    _importable_tests()
    from benchmarks.report import machine

    start = os.getloadavg()
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}}
    config.work.mkdir(parents=True, exist_ok=True)
    runs = {"slow-uploads": slow_uploads, "large-answer": large_answer, "fuzz": fuzz}
    for name in config.scenarios:
        with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=config.work) as work:
            began = time.perf_counter()
            result[name] = runs[name](Path(work), config)
            result[name]["scenario_s"] = time.perf_counter() - began
    result["machine"] = machine(start) | cpu_identity()
    return result


def _importable_tests() -> None:
    """The scenarios are the tests' own: their helpers come from this checkout's tests/ package."""
    if not (ROOT / "tests" / "e2e").is_dir():
        raise SystemExit("normfuse bench hostile runs the tests' scenarios with their helpers (tests/e2e): run it "
                         "from a source checkout, with the test extra installed")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def slow_uploads(work: Path, config: HostileConfig) -> dict:
    """The tricklers and the normal requests at the test's settings (and the defaults): what each got."""
    from tests.e2e.test_slow_uploads import HELD, run_tricklers
    from tests.e2e.test_status_codes import launch
    from tests.process import stop

    runs = {"held": HELD, **({"defaults": {}} if config.defaults_run else {})}
    out = {}
    for name, settings in runs.items():
        (work / name).mkdir()
        proc, url, _gate, log = launch(work / name, **settings)
        try:
            began = time.perf_counter()
            codes, answers = run_tricklers(url, config.tricklers, config.normal)
            seconds = time.perf_counter() - began
            ready = _ready(url)
        finally:
            stop(proc)
        out[name] = {"settings": settings, "normal": _counts(codes), "tricklers": _trickler_counts(answers),
                     "seconds": seconds, "ready_after": ready, "tracebacks": log.read_text().count("Traceback")}
    return {"runs": out}


def _trickler_counts(answers: list) -> dict[str, int]:
    """What the tricklers got: the answer's status line and the setting it named, and how the connection ended."""
    seen: collections.Counter = collections.Counter()
    for answer, how in answers:
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace").removeprefix("HTTP/1.1 ") or "no answer read"
        named = next((s for s in ("min_upload_bytes_per_s", "body_timeout_s") if s.encode() in answer), "")
        seen[f"{status}{f' ({named})' if named else ''}, connection {how}"] += 1
    return dict(seen.most_common())


def large_answer(work: Path, config: HostileConfig) -> dict:
    """The GPT-2-shaped model's `positions`-token logits asked for as JSON: refused, how fast, what memory."""
    from tests.e2e.test_large_answer import VOCAB, ask_for_every_logit, gpt2_repo
    from tests.service.server_process import Server

    began = time.perf_counter()
    repo = gpt2_repo(work, config.positions)
    converted_s = time.perf_counter() - began
    server = Server(repo)
    try:
        asked = ask_for_every_logit(server.url, server.proc.pid, config.positions)
        ready = _ready(server.url)
    finally:
        server.stop()
    return {**asked, "shape": [1, config.positions, VOCAB], "json_bytes_about": config.positions * VOCAB * 16,
            "binary_bytes": config.positions * VOCAB * 4, "convert_s": converted_s, "ready_after": ready,
            "tracebacks": server.output().count("Traceback")}


def fuzz(work: Path, config: HostileConfig) -> dict:
    """The fuzz test's requests, `rest_cases` + `grpc_cases`, to one server: statuses, server errors, CPU."""
    import httpx

    from tests.e2e.test_fuzz import cpu_s, fuzz_grpc, fuzz_rest
    from tests.e2e.test_grpc import GrpcServer
    from tests.service.repo_builder import build_test_repo

    server = GrpcServer(build_test_repo(work / "repo", broken=False))
    rest, grpc_codes, failures = collections.Counter(), collections.Counter(), []
    try:
        began, client_cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_s(server.proc.pid)
        sent = {"rest": fuzz_rest(server.url, config.rest_cases, rest, failures),
                "grpc": fuzz_grpc(server.grpc, config.grpc_cases, grpc_codes, failures)}
        seconds = time.perf_counter() - began
        cpu = {"client_s": time.process_time() - client_cpu, "server_s": cpu_s(server.proc.pid) - server_cpu}
        normal = httpx.post(f"{server.url}/v2/models/linear/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))}]}).status_code
    finally:
        server.stop()
    return {"sent": sent, "rest": dict(rest.most_common()), "grpc": dict(grpc_codes.most_common()),
            "server_errors": [list(f[:3]) for f in failures], "seconds": seconds, "cpu": cpu,
            "normal_after": normal, "tracebacks": server.output().count("Traceback")}


def _ready(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


def _counts(codes: list[int]) -> dict[str, int]:
    return {str(code): n for code, n in collections.Counter(codes).most_common()}


def cpu_identity() -> dict[str, str]:
    """The CPU's family and model numbers (a name such as "AMD EPYC" says little) and its vector and matrix flags
    that matter to inference (AVX-512, VNNI, BF16, AMX), as /proc/cpuinfo gives them."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first logical CPU
    except OSError:
        return {"cpu family/model": "unknown", "cpu flags": "unknown"}
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    present = set(fields.get("flags", "").split())
    flags = " ".join(f for f in wanted if f in present) + ("" if "amx_tile" in present else " (no AMX)")
    return {"cpu family/model": f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}",
            "cpu flags": flags}
