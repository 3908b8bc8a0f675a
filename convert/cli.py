"""`normfuse convert SOURCE --name NAME --repo DIR [--variants LIST]`.

Backends beyond ONNX Runtime plug in through BACKENDS: a module named there may define
`add_arguments(parser)` (its own options, e.g. --precision) and `check(args)` (raise, before converting, when
it cannot build here), and must define `build(model_dir, manifest, args)`, called after the ONNX conversion
has been written (e.g. to build TensorRT plans from each variant's ONNX).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from convert import plans as plans_cli

log = logging.getLogger(__name__)

# backend -> module providing add_arguments(parser) / build(model_dir, manifest, args); None: nothing to add
BACKENDS: dict[str, str | None] = {
    "onnxruntime": None,
    "tensorrt": "convert.tensorrt.build",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="rewrite a model's normalization layers, export and verify every variant",
        description="Convert SOURCE (a built-in model or a local Hugging Face directory) into DIR/NAME: one "
                    "ONNX file per variant, verified against the original, and a manifest.json.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="built-in model (vit-digits, vit-digits-un, vit-digits-pn) or a Hugging Face model "
                             "directory holding config.json and *.safetensors")
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument("--repo", required=True, type=Path, metavar="DIR", help="the model repository")
    parser.add_argument("--variants", type=variant_list, default=None, metavar="LIST",
                        help="comma-separated variants (default: unfused + every exact variant that applies; "
                             "add nonorm for the benchmark-only no-norm bound, int8 for the gated lossy int8 "
                             "variant, int8-plain for its unsmoothed comparison)")
    add_int8_arguments(parser)
    parser.add_argument("--backend", choices=list(BACKENDS), default="onnxruntime",
                        help="engines to prepare besides the ONNX files (default: onnxruntime)")
    parser.add_argument("--samples", type=positive, default=32, help="held-out samples for parity (default 32)")
    parser.add_argument("--no-benchmark", action="store_true",
                        help="skip the conversion-time benchmark; default_variant is then unfused")
    parser.add_argument("--no-torch", action="store_true", help="do not save model.pt (the torch module, for the torch backend)")
    parser.add_argument("--threads", type=positive, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="print the conversion log (every decision, tracebacks of failed variants) on stderr; "
                             "it is always written to DIR/NAME/convert.log")
    plans_cli.add_arguments(parser)  # --cpu-precision, --engines, --plan-min-* (convert.plans)
    for module_name in filter(None, BACKENDS.values()):
        module = _backend_module(module_name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    parser.set_defaults(handler=run)


def add_int8_arguments(parser) -> None:
    """The lossy variants' options (see convert.quantize.Int8Options)."""
    group = parser.add_argument_group("int8 (lossy, only with --variants ...,int8)")
    group.add_argument("--int8-min-agreement", type=unit_interval, default=0.99, metavar="A",
                       help="gate: top-1 agreement with unfused on held-out data (default 0.99)")
    group.add_argument("--int8-min-cosine", type=unit_interval, default=0.999, metavar="C",
                       help="gate: cosine similarity of the outputs with unfused (default 0.999)")
    group.add_argument("--int8-alpha", type=unit_interval, default=0.5, metavar="ALPHA",
                       help="SmoothQuant migration strength α in [0, 1] (default 0.5)")
    group.add_argument("--int8-method", choices=("smoothquant", "repq"), default="smoothquant",
                       help="how the per-channel scales are chosen (default smoothquant)")
    group.add_argument("--int8-post-ln", choices=("scale", "skip"), default="scale",
                       help="norms whose output is also the Post-LN residual (BERT): give their linear readers an "
                            "explicit 1/s (one Mul each, scale) or leave them unsmoothed (skip); default scale")
    group.add_argument("--int8-calibration", type=positive, default=64, metavar="N",
                       help="calibration inputs, disjoint from the held-out ones (default 64)")
    group.add_argument("--allow-lossy-default", action="store_true",
                       help="let a lossy variant that passed its gate become default_variant if it is fastest")


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of variants")
    return names


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from convert.export import ExportError
    from convert.models import SourceError
    from convert.pipeline import ConversionError, ConvertOptions, convert
    from convert.quantize import Int8Options

    log_file = setup_logging(getattr(args, "verbose", False))
    if Path(args.source).is_dir():
        quiet_transformers()
    options = ConvertOptions(
        variants=args.variants, include_bound=bool(args.variants and "nonorm" in args.variants),
        samples=args.samples, benchmark=not args.no_benchmark, torch_artifacts=not args.no_torch,
        threads=args.threads, progress=not args.quiet, allow_lossy_default=args.allow_lossy_default,
        int8=Int8Options(alpha=args.int8_alpha, method=args.int8_method, min_agreement=args.int8_min_agreement,
                         min_cosine=args.int8_min_cosine, calibration_samples=args.int8_calibration,
                         post_ln_scale=args.int8_post_ln == "scale"),
        plans=plans_cli.options_from(args),
    )
    backend = _backend_module(BACKENDS[args.backend]) if BACKENDS[args.backend] else None
    if BACKENDS[args.backend] and (backend is None or not hasattr(backend, "build")):
        return fail(f"backend {args.backend!r} is not available in this installation")
    try:
        if hasattr(backend, "check"):  # fail fast, before a long conversion, when the backend cannot build here
            backend.check(args)
    except Exception as exc:  # the backend's own error says what is missing
        return fail(f"backend {args.backend!r} cannot build engines here: {exc}")
    try:
        manifest = convert(args.source, args.name, args.repo, options)
    except SourceError as exc:
        return fail(f"cannot use SOURCE {args.source!r}: {exc}")
    except PermissionError as exc:
        return fail(f"{exc}. Choose a --repo directory you can write to.")
    except (ConversionError, ExportError) as exc:  # one line; the exporter's own output is in the log
        return fail(f"could not convert {args.source!r}: {exc} (log: {log_file})")
    except ValueError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:  # conversions are written to a temp dir and moved into place only at the end
        return fail(f"interrupted; {args.repo / args.name} was left as it was", code=130)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure: one paragraph here, the traceback in the log
        log.debug("conversion failed", exc_info=True)
        return fail(f"could not convert {args.source!r}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]} "
                    f"(the traceback is in {log_file})")
    with contextlib.suppress(OSError):  # the log travels with the model (a missing directory keeps it in /tmp)
        shutil.copyfile(log_file, args.repo / args.name / "convert.log")
    sys.stdout.write(summary(manifest, args.repo / args.name) + plans_cli.summary(manifest))
    if backend is not None:
        try:
            backend.build(args.repo / args.name, manifest, args)
        except RuntimeError as exc:  # the backend's errors (parse, build, cache, manifest) say what went wrong
            return fail(f"the ONNX variants were written to {args.repo / args.name}, but building "
                        f"{args.backend} engines failed: {exc}")
        except KeyboardInterrupt:
            return fail(f"interrupted while building {args.backend} engines; the ONNX variants are in place", code=130)
    return 0


def fail(message: str, code: int = 2) -> int:
    sys.stderr.write(textwrap.fill(f"normfuse convert: error: {message}", width=100) + "\n")
    return code


def summary(manifest, model_dir: Path) -> str:
    """One screen: a line per variant (built / refused with a one-line reason / flagged), then the default."""
    lines = [f"wrote {model_dir}/manifest.json ({manifest.source}, {manifest.task})"]
    for name, info in manifest.variants.items():
        worst = max((p.rel_l2 for p in info.parity), default=0.0)
        norms = ", ".join(f"{op} {n}" for op, n in info.op_census.items() if op != "total") or "no norm ops"
        speed = info.latency_ms.get(next((k for k in info.latency_ms if k.endswith("_vs_unfused")), ""), None)
        state = "built" if info.servable else ("benchmark-only" if info.benchmark_only else "NOT servable")
        lines.append(f"  {name:<9} {state:<14} rel_l2 {worst:.1e}  [{norms}]"
                     + (f"  {speed:.2f}x unfused time" if speed else ""))
        lines += [f"            flagged: {one_line(flag)}" for flag in info.flags]
        if info.accuracy is not None:  # a lossy variant: what its gate saw
            acc = info.accuracy
            task = "".join(f", {k} {v:.4f}" for k, v in acc.task.items())
            lines.append(f"            accuracy vs unfused ({acc.samples} held-out): cosine {acc.cosine:.6f}, "
                         f"top-1 agreement {acc.top1_agreement}{task}; gate {'passed' if acc.passed else 'FAILED'}")
    for name, reason in manifest.not_applicable.items():
        lines.append(f"  {name:<9} refused        {one_line(reason)}")
    lines.append(f"default variant: {manifest.default_variant}  (details: {model_dir}/convert.log)")
    return "\n".join(lines) + "\n"


def one_line(text: str, width: int = 150) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def setup_logging(verbose: bool) -> Path:
    """Everything (DEBUG) to a log file that ends up in the model directory; stderr gets errors only, or the
    whole log with --verbose. Returns the file's path."""
    handle, name = tempfile.mkstemp(prefix="normfuse-convert-", suffix=".log")
    os.close(handle)
    file_handler = logging.FileHandler(name)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.ERROR)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # their DEBUG output is graph dumps
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(file_handler)
    root.addHandler(console)
    # Python warnings (tracing and export chatter) go to the log file, not the terminal
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = False
    logging.getLogger("py.warnings").addHandler(file_handler)
    return Path(name)


def quiet_transformers() -> None:
    """Keep the terminal for our own progress and errors: no weight-loading bars or config warnings."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _backend_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        log.debug("backend module %s not importable: %s", name, exc)
        return None
