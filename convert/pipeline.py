"""The conversion pipeline: SOURCE -> rewritten variants -> verified ONNX (+ torch.export) files -> manifest.

    load source -> for each variant: rewrite (NotApplicable -> reason) -> verify in torch -> export ONNX
    -> ONNX Runtime parity against the ORIGINAL torch model on held-out data -> op census
    -> short interleaved benchmark (unfused, v, unfused, v ...) -> default_variant (only a variant whose
    speed-up's 95% interval excludes 1) -> manifest.json

Everything is written into a temporary directory inside the repository and moved into place at the end,
so a failed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import gc
import logging
import math
import mmap as mmap_module
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert.constraints import input_constraints
from convert.export import (
    OPSET,
    ExportError,
    census,
    check_onnx,
    export_onnx,
    export_torch,
    lost_fusions,
    ort_session,
)
from convert.exportable import describe_export
from convert.lossy import LOSSY_VARIANTS
from convert.models import Source, load_source
from convert.quantize import Int8Options
from convert.rewrites import BENCHMARK_ONLY, EXACT_VARIANTS
from convert.trt_parity import save_parity_inputs
from engines.manifest import Manifest, VariantInfo, file_ref, write_manifest

log = logging.getLogger(__name__)


class ConversionError(RuntimeError):
    """The conversion could not produce a servable model (the message says why)."""


@dataclass
class ConvertOptions:
    variants: list[str] | None = None   # None: unfused + every exact variant that applies
    include_bound: bool = False         # also build the benchmark-only `nonorm` bound
    samples: int = 32                   # held-out samples for parity
    benchmark: bool = True              # time variants at conversion to pick default_variant
    benchmark_rounds: int = 8           # A B A B ... rounds per variant pair (8: one lost round still bounds the median)
    benchmark_batch: int = 8
    torch_artifacts: bool = True        # also save model.pt per variant (TorchEngine)
    threads: int | None = None          # ORT intra-op threads (None: all cores)
    progress: bool = True
    max_batch_size: int = 32
    tools: dict[str, str] = field(default_factory=dict)
    int8: Int8Options | None = None     # calibration + accuracy gate of the lossy variants (None: defaults)
    allow_lossy_default: bool = False   # a gated lossy variant (int8) may become default_variant


def convert(source: str | Source, name: str, repo: str | Path, options: ConvertOptions | None = None) -> Manifest:
    """Convert SOURCE into REPO/NAME (manifest.json + one directory per variant); return the manifest."""
    options = options or ConvertOptions()
    names = requested_variants(options)
    repo = Path(repo)
    staging = make_staging(repo, name)  # fails early (before any training) on an unwritable repository
    try:
        src = source if isinstance(source, Source) else load_source(source, progress=options.progress)
        built, not_applicable = {}, {}
        bar = tqdm(names, desc="rewrite/verify/export", unit="variant", disable=not options.progress)
        context = Context(src, staging, options.samples, options.threads, options.torch_artifacts, options.int8)
        try:
            for variant in bar:
                bar.set_postfix_str(variant)
                info = build_variant(context, variant, not_applicable)
                release_memory()  # a variant's model copy, export buffers and session are gone: give the pages back
                if info is not None:
                    built[variant] = info
            if "unfused" not in built or not built["unfused"].servable:
                raise ConversionError(unfused_failure(built.get("unfused"), not_applicable.get("unfused")))
            flag_lost_fusions(built)
            default = "unfused"
            if options.benchmark and len(built) > 1:
                # while the source's weights are still parked: only the benchmark's sessions are resident
                context.reference = None
                release_memory()
                default = benchmark(context, built, options.benchmark_rounds, options.benchmark_batch,
                                    progress=options.progress, allow_lossy=options.allow_lossy_default)
        finally:
            context.weights.close()  # the caller's Source gets its model's weights back
        manifest = Manifest(
            name=name, source=str(source if not isinstance(source, Source) else source.name), task=src.task,
            tools=tool_versions() | options.tools, inputs=src.inputs, outputs=src.outputs,
            max_batch_size=options.max_batch_size, variants=built, not_applicable=not_applicable,
            default_variant=default, constraints=input_constraints(src),
            allow_lossy_default=options.allow_lossy_default,
        )
        save_parity_inputs(staging, context.held_out)  # the batch later backends' parity gates run on
        write_manifest(staging, manifest)
        move_into_place(staging, repo / name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def requested_variants(options: ConvertOptions) -> list[str]:
    names = list(options.variants) if options.variants else ["unfused", *EXACT_VARIANTS]
    if options.include_bound:
        names += [v for v in BENCHMARK_ONLY if v not in names]
    if "unfused" in names:
        names.remove("unfused")
    known = (*EXACT_VARIANTS, *BENCHMARK_ONLY, *LOSSY_VARIANTS)
    unknown = [v for v in names if v not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of unfused, {', '.join(known)}")
    return ["unfused", *names]  # unfused is always built: it is the reference and the fallback default


def make_staging(repo: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain directory name")
    try:
        repo.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repo))
    except OSError as exc:
        raise PermissionError(f"cannot write to model repository {repo}: {exc.strerror or exc}") from exc


def move_into_place(staging: Path, final: Path) -> None:
    """Replace `final` by `staging`, so readers see the old model or the new one, never half of one.

    An existing `final` is swapped with `staging` in one step (Linux `renameat2(RENAME_EXCHANGE)`): `final` never
    goes missing, and a server polling the repository sees one revision, then the next. Where the filesystem
    cannot (NFS, non-Linux), two renames leave `final` absent for an instant; the server's poller tolerates that
    (service.control: a model is unloaded only after it has been gone for a grace period)."""
    if final.exists() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the old model, now under the staging name
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot (then nothing was changed)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(b))


def unfused_failure(info, reason: str | None) -> str:
    if info is None:
        return f"the original model could not be exported: {reason}"
    failed = [p for p in info.parity if not p.passed]
    detail = "; ".join(f"{p.candidate}: rel_l2 {p.rel_l2:.3g} > gate {p.gate.get('rel_l2')}" for p in failed)
    return f"the exported original model does not match torch ({detail})"


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and peak RSS
    then grows by one model copy per variant)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


MADV_DONTNEED = 4  # <sys/mman.h> on Linux
PARK_MIN_BYTES = 64 * 1024**2  # smaller models stay in memory (nothing to gain from a file)


class ParkedWeights:
    """A model's parameters kept in a temporary file while the pipeline does not need them.

    Between rewrites the source model only waits for the next variant, while that variant's copy is
    verified, exported, checked and run: parking writes the parameters to a file once and empties them;
    `restore` maps the file back (`torch.load(mmap=True)`: pages are read as the rewrite touches them).
    The Parameter objects stay the same, so tied weights stay tied; only their `.data` is swapped.
    Models under PARK_MIN_BYTES or not on the CPU are left alone.
    """

    def __init__(self, model) -> None:
        self.params = dict(model.named_parameters())
        size = sum(p.numel() * p.element_size() for p in self.params.values())
        self.enabled = size >= PARK_MIN_BYTES and all(p.device.type == "cpu" for p in self.params.values())
        self.path: Path | None = None
        self.parked = False
        self._mapped: dict | None = None  # the mapped state while restored with mmap (keeps the mapping alive)

    def park(self) -> None:
        import torch

        if not self.enabled or self.parked:
            return
        if self.path is None:
            handle, name = tempfile.mkstemp(prefix="normfuse-source-", suffix=".pt")
            os.close(handle)
            self.path = Path(name)
            torch.save({name: p.detach() for name, p in self.params.items()}, str(self.path))
        for param in self.params.values():
            param.data = torch.empty(0, dtype=param.dtype)
        self._mapped = None
        self.parked = True
        release_memory()

    def restore(self, *, mmap: bool = True) -> None:
        import torch

        if not self.parked:
            return
        state = torch.load(str(self.path), mmap=mmap, weights_only=True)
        for name, param in self.params.items():
            param.data = state[name]
        self._mapped = state if mmap else None
        self.parked = False

    def shed(self) -> None:
        """Drop the mapped file's pages from this process's RSS (no-op unless restored with mmap).

        The pages a rewrite has read count in RSS as long as they stay mapped; `MADV_DONTNEED` on the
        file's private, never-written mapping only unmaps them: a later read faults them back in from the
        page cache with the same contents (the rewrites never write a tensor in place).
        """
        if self._mapped is None:
            return
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in self._mapped.values()
                 if t.untyped_storage().nbytes()]
        if not spans:
            return
        page = mmap_module.PAGESIZE
        start = min(ptr for ptr, _ in spans) // page * page  # the mapping starts on a page below the data
        end = -(-max(ptr + size for ptr, size in spans) // page) * page  # and ends on the same last page
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # not glibc
            return
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

    @contextlib.contextmanager
    def shedding(self, every: float = 0.02):
        """While the body runs, shed the mapped pages every `every` seconds (a rewrite reads the source
        weight by weight: only the few it has just read stay resident, not the whole 0.5 GB file)."""
        if self._mapped is None:
            yield
            return
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every):
                self.shed()

        thread = threading.Thread(target=loop, name="normfuse-shed", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.shed()

    def close(self) -> None:
        """Restore the weights into memory (no longer backed by the file) and delete the file."""
        try:
            self.restore(mmap=False)
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
                self.path = None


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("normfuse", "torch", "onnx", "onnxruntime", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ----------------------------------------------------------------------------- one variant

DESCRIPTIONS = {
    "unfused": "the original model, exported as is",
    "affine": "LayerNorm/RMSNorm γ, β folded into the linear layers that read them",
    "rmsnorm": "Pre-LN -> Pre-RMSNorm: residual writers re-centred, LayerNorm replaced by RMSNorm",
    "crmsnorm": "Pre-CRMSNorm: residual stream compressed to d-1, CRMSNorm",
    "folded": "BatchNorm / Unified Normalization / PowerNorm statistics folded into neighbouring layers",
    "nonorm": "every normalization removed: the no-norm speed bound, not the same function (benchmark only)",
}


@dataclass
class Context:
    source: Source
    staging: Path
    samples: int
    threads: int | None
    torch_artifacts: bool
    int8: Int8Options | None = None

    def __post_init__(self) -> None:
        import torch

        from convert.verify import run

        self.samples = parity_samples(self.source, self.samples)
        self.held_out = self.source.sample_inputs(self.samples)
        # batch 2 so the exporter cannot specialise on 1, and a shorter sequence than the held-out data so
        # the parity check proves the sequence axis really stayed dynamic
        self.example = shorter(self.source.sample_inputs(2), self.source.inputs)
        # what the rewrites trace the model with: a small held-out batch (models need no example_inputs())
        self.trace = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.source.sample_inputs(2).items()}
        self.reference = run(self.source.model, self.held_out, torch.float32)  # the ORIGINAL model's outputs
        self.weights = ParkedWeights(self.source.model)


OUTPUT_BUDGET = 8 * 1024**2  # output elements kept per parity run (64 MB in float64): GPT-2's logits are 1.6M/sample


def parity_samples(source: Source, wanted: int) -> int:
    """`wanted`, capped so the held-out outputs stay within OUTPUT_BUDGET elements (at least 2 samples)."""
    probe = source.sample_inputs(1)
    length = next((probe[t.name].shape[1] for t in source.inputs if len(t.shape) > 1 and t.shape[1] == -1), 1)
    per_sample = sum(int(np.prod([length if d == -1 else d for d in t.shape[1:]])) for t in source.outputs)
    capped = max(2, min(wanted, OUTPUT_BUDGET // max(per_sample, 1)))
    if capped < wanted:
        log.info("parity on %d samples instead of %d: each sample has %d output values", capped, wanted, per_sample)
    return capped


def shorter(arrays: dict[str, np.ndarray], inputs) -> dict[str, np.ndarray]:
    """Cut every dynamic non-batch axis to 3/4 of its length (at least 1)."""
    out = dict(arrays)
    for info in inputs:
        for axis, dim in enumerate(info.shape[1:], start=1):
            if dim == -1:
                length = out[info.name].shape[axis]
                out[info.name] = np.take(out[info.name], range(max(1, length * 3 // 4)), axis=axis)
    return out


def build_variant(ctx: Context, variant: str, not_applicable: dict[str, str]) -> VariantInfo | None:
    """Rewrite, verify, export and census one variant; None (with the reason recorded) when it cannot be built."""
    from convert.lossy import build_lossy
    from convert.models.hf import user_names
    from convert.quantize import QuantizationError
    from convert.rewrites import NotApplicable
    from convert.rewrites.check import first_line

    try:
        return (build_lossy if variant in LOSSY_VARIANTS else _build)(ctx, variant)
    except (NotApplicable, QuantizationError) as exc:
        log.info("variant %s does not apply: %s", variant, exc)
        not_applicable[variant] = user_names(str(exc), ctx.source.model)
    except ImportError as exc:  # the rewrite's module is not part of this installation
        log.warning("variant %s is not available: %s", variant, exc)
        not_applicable[variant] = f"rewrite not available: {exc}"
    except ExportError as exc:
        log.warning("variant %s could not be exported: %s", variant, exc)
        not_applicable[variant] = user_names(str(exc), ctx.source.model)
    except Exception as exc:
        if variant == "unfused":
            raise
        log.debug("variant %s failed", variant, exc_info=True)  # the traceback: --verbose and the log file
        log.warning("variant %s failed: %s", variant, first_line(exc))
        not_applicable[variant] = user_names(f"failed: {first_line(exc)}", ctx.source.model)
    return None


def _build(ctx: Context, variant: str) -> VariantInfo:
    import torch

    from convert.rewrites import rewrite, shared_tensors
    from convert.verify import compare, run

    src, parity, flags = ctx.source, [], []
    if variant == "unfused":
        # a copy over the same tensors: tracing for export may set module attributes (HF Swin turns its window
        # size into a traced tensor), which must not leak into the source that the rewrites trace next
        model = copy.deepcopy(src.model, shared_tensors(src.model))
    else:
        ctx.weights.restore()
        try:
            # the copy shares the tensors the rewrite leaves alone; parking then swaps only the source's
            with ctx.weights.shedding():
                model = rewrite(src.model, variant, inputs=ctx.trace, share_weights=True, check=False)
        finally:
            ctx.weights.park()  # from here on only the variant's copy is in memory
    reference = "torch unfused fp32"
    if variant != "unfused":
        torch_check = compare(ctx.reference, run(model, ctx.held_out, torch.float32), dtype="float32")
        parity.append(torch_check.to_parity(reference, f"torch {variant} fp32"))
    directory = ctx.staging / variant
    exporter = describe_export(model, OPSET)  # e.g. a fused MoE's experts are exported as batched_mm
    onnx_path = export_onnx(model, ctx.example, directory / "model.onnx", inputs=src.inputs, outputs=src.outputs,
                            check=False)
    files = {"onnx": file_ref(ctx.staging, onnx_path)}
    if ctx.torch_artifacts:
        try:
            files["torch"] = file_ref(ctx.staging, export_torch(model, directory / "model.pt"))
        except ExportError as exc:
            log.warning("variant %s: no torch artifact: %s", variant, exc)
            flags.append(f"no-torch-artifact: {str(exc).splitlines()[0][:200]}")
    del model
    ctx.weights.park()  # after the unfused export the source waits for the next rewrite (no-op otherwise)
    release_memory()
    check_onnx(onnx_path)  # holds the ONNX model twice: run once the torch copy is gone
    op_census, outputs = census(onnx_path, threads=ctx.threads, inputs=ctx.held_out)
    ort_check = compare(ctx.reference, outputs, dtype="float32")
    parity.append(ort_check.to_parity(reference, f"onnxruntime cpu {variant} fp32"))
    bound = variant in BENCHMARK_ONLY
    return VariantInfo(
        name=variant, description=DESCRIPTIONS.get(variant, ""), exact=not bound, benchmark_only=bound,
        servable=not bound and all(p.passed for p in parity), files=files, parity=parity,
        op_census=op_census, flags=flags, exporter=exporter,
    )


def flag_lost_fusions(built: dict[str, VariantInfo]) -> None:
    reference = built["unfused"].op_census
    for name, info in built.items():
        if name != "unfused":
            info.flags.extend(lost_fusions(reference, info.op_census))


# ----------------------------------------------------------------------------- benchmark

NOISE = 0.03  # a variant must be ≥ 3% faster (median of paired ratios, its 95% bound below 1) to become the default
REPEATS = 3  # each timing is the best of 3 runs: noise on a shared machine only ever adds time
BUDGET_S = 6.0  # seconds per (unfused, variant) pair; fewer rounds (at least 3) for slow models


BOTH_SESSIONS_MAX_BYTES = 256 * 1024**2  # two ONNX files at most this large are benchmarked with both sessions open


def benchmark(ctx: Context, built: dict[str, VariantInfo], rounds: int, batch: int, *, progress: bool,
              allow_lossy: bool = False) -> str:
    """Time unfused against each other variant, interleaved (A B, B A, ...); return the default variant.

    The order A B B A A B ... runs each model twice in a row, so when the two ONNX files together are over
    BOTH_SESSIONS_MAX_BYTES only one session is open at a time (reopened once per round: GPT-2-small's
    two sessions together would hold 1.5 GB); smaller models keep both open. Each timing is the best of
    REPEATS runs, so the first run of a reopened session does not count against it.
    """
    inputs = ctx.source.sample_inputs(batch)
    paths = {name: ctx.staging / info.files["onnx"].path for name, info in built.items()}
    others = [v for v in built if v != "unfused"]
    bar = tqdm(total=rounds * len(others), desc="benchmark", unit="round", disable=not progress)
    baseline_times, ratios, wins, pairs = [], {}, {}, {}
    for variant in others:
        pair = Sessions(paths["unfused"], paths[variant], threads=ctx.threads)
        warm = max(timed(pair.get(name), inputs) for name in (variant, "unfused"))  # warm-up; round 0 starts with unfused
        pair_rounds = max(3, min(rounds, int(BUDGET_S / (2 * REPEATS * warm))))
        times = {"unfused": [], variant: []}
        for r in range(pair_rounds):
            for name in (("unfused", variant) if r % 2 == 0 else (variant, "unfused")):
                session = pair.get(name)
                times[name].append(min(timed(session, inputs) for _ in range(REPEATS)))
                del session
            bar.update()
        bar.update(rounds - pair_rounds)
        pair.close()
        baseline_times += times["unfused"]
        paired = [b / a for a, b in zip(times["unfused"], times[variant], strict=True)]
        # faster beyond noise: the median paired ratio clears NOISE and the variant won most rounds
        ratios[variant], pairs[variant] = statistics.median(paired), paired
        wins[variant] = sum(r < 1 for r in paired) / len(paired)
        built[variant].latency_ms = {f"ort_cpu_b{batch}_median": statistics.median(times[variant]) * 1e3,
                                     f"ort_cpu_b{batch}_vs_unfused": ratios[variant],
                                     f"ort_cpu_b{batch}_win_rate": wins[variant]}
    bar.close()
    built["unfused"].latency_ms = {f"ort_cpu_b{batch}_median": statistics.median(baseline_times) * 1e3}
    for variant, paired in pairs.items():
        if math.isfinite(bound := median_upper_bound(paired)):
            built[variant].latency_ms[f"ort_cpu_b{batch}_vs_unfused_upper95"] = bound
    faster = [v for v in others if (built[v].exact or allow_lossy) and is_safe_default(built[v], pairs[v])]
    log.info("benchmark ratios vs unfused: %s", {v: round(r, 3) for v, r in ratios.items()})
    return min(faster, key=ratios.__getitem__) if faster else "unfused"


MIN_ROUNDS = 5  # fewer paired rounds cannot exclude 1 at 95% with a sign-based interval


def median_upper_bound(ratios: list[float], confidence: float = 0.95) -> float:
    """A distribution-free one-sided upper confidence bound of the median paired ratio (variant/unfused).

    The true median is ≤ the j-th smallest ratio with probability P(Binomial(n, ½) ≤ j−1); take the
    smallest j reaching `confidence` (with n = 5 that is the largest ratio: all five rounds must be won).
    inf when there are too few rounds for any bound.
    """
    ordered, n = sorted(ratios), len(ratios)
    for j in range(1, n + 1):
        if sum(math.comb(n, k) for k in range(j)) / 2**n >= confidence:
            return ordered[j - 1]
    return math.inf


def is_safe_default(info: VariantInfo, paired: list[float]) -> bool:
    """A fused variant becomes the default only when it is servable, lost no fusion, ran MIN_ROUNDS rounds,
    its median ratio clears NOISE, and the upper 95% bound of that median excludes 1 (it is faster)."""
    if not info.servable or any(flag.startswith("lost-fusion") for flag in info.flags) or len(paired) < MIN_ROUNDS:
        return False
    return statistics.median(paired) <= 1 - NOISE and median_upper_bound(paired) < 1.0


class Sessions:
    """The benchmark's two ONNX Runtime sessions: both open for small models, one at a time for large ones."""

    def __init__(self, *paths: Path, threads: int | None) -> None:
        self.paths = dict(zip(("unfused", "variant"), paths, strict=True))
        self.threads = threads
        self.both = sum(p.stat().st_size for p in paths) <= BOTH_SESSIONS_MAX_BYTES
        self.open: dict[Path, object] = {}
        self.opened = 0  # sessions created (a test reads it)

    def get(self, name: str):
        path = self.paths["unfused" if name == "unfused" else "variant"]
        if path not in self.open:
            if not self.both:
                self.close()  # the other session's memory is given back before this one is built
            self.open[path] = ort_session(path, threads=self.threads)
            self.opened += 1
        return self.open[path]

    def close(self) -> None:
        self.open.clear()
        release_memory()


def timed(session, inputs: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, inputs)
    return time.perf_counter() - start
