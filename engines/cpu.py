"""What this CPU can run at speed: its model name and the instruction-set flags that decide a plan's precision.

    cpu = detect()                       # /proc/cpuinfo, capped by ONEDNN_MAX_CPU_ISA when it is set
    cpu.can_run_natively("bf16")         # (False, "bf16 needs AMX-BF16 or AVX512-BF16; ...") on an AVX2-only CPU

A plan chosen on one machine may be emulated (a cliff, not a slope: bf16 without AMX or AVX512-BF16 ran ViT-S 33x
slower than ORT fp32, notes/openvino.md) on another, so conversion records the CPU it timed plans on and the
server checks its own before serving a reduced-precision plan. `ONEDNN_MAX_CPU_ISA` caps the ISA oneDNN (and so
OpenVINO's CPU plugin) may use: the flags above the cap are dropped, which also lets tests exercise the fallback
on a machine that has the units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CPUINFO = Path("/proc/cpuinfo")
# the flags that decide which precisions run natively (Linux /proc/cpuinfo names)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")

# ONEDNN_MAX_CPU_ISA values (oneDNN's dnnl_cpu_isa_t names, lower case) -> the flags that ISA level allows.
# Each level adds to the one before it; ALL (or unset) means no cap.
_LEVELS: list[tuple[str, tuple[str, ...]]] = [
    ("sse41", ()),
    ("avx", ()),
    ("avx2", ("avx2",)),
    ("avx2_vnni", ("avx2",)),
    ("avx2_vnni_2", ("avx2",)),
    ("avx512_core", ("avx2", "avx512f")),
    ("avx512_core_vnni", ("avx2", "avx512f", "avx512_vnni")),
    ("avx512_core_bf16", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")),
    ("avx10_1_512", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")),
    ("avx512_core_fp16", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")),
    ("avx512_core_amx", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")),
    ("avx10_1_512_amx", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")),
    ("avx512_core_amx_fp16", FLAGS),
    ("all", FLAGS),
]
ISA_CAPS = dict(_LEVELS)

PRECISIONS = ("fp32", "bf16", "f16", "int8")


class CpuInfo(BaseModel):
    """The CPU a plan was timed on (recorded in the manifest) or the one serving it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(description="/proc/cpuinfo 'model name', e.g. 'Intel(R) Xeon(R) Platinum 8580'")
    flags: list[str] = Field(description=f"which of {', '.join(FLAGS)} it has (after the ISA cap)")
    isa_cap: str | None = Field(None, description="ONEDNN_MAX_CPU_ISA when it was set")

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def can_run_natively(self, precision: str) -> tuple[bool, str]:
        """(True, how) when `precision` (fp32 | bf16 | f16 | int8) runs on this CPU's own units, else (False, why)."""
        need = NATIVE.get(_canonical(precision))
        if need is None:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        have = [flag for flag in need.any_of if self.has(flag)]
        if have or not need.any_of:
            return True, f"{precision} runs natively on {' / '.join(f.upper() for f in have) or 'any x86-64 CPU'}"
        cap = f" (capped by ONEDNN_MAX_CPU_ISA={self.isa_cap})" if self.isa_cap else ""
        return False, (f"{precision} needs {' or '.join(f.upper() for f in need.any_of)}; this CPU "
                       f"({self.model_name}) has {', '.join(self.flags) or 'none of the flags that matter'}{cap}: "
                       f"{need.otherwise}")

    def summary(self) -> str:
        cap = f", ONEDNN_MAX_CPU_ISA={self.isa_cap}" if self.isa_cap else ""
        return f"{self.model_name} [{' '.join(self.flags)}{cap}]"


@dataclass(frozen=True)
class _Need:
    any_of: tuple[str, ...]
    otherwise: str


NATIVE = {
    "fp32": _Need((), ""),  # every CPU runs fp32 (AVX-512 / AVX2 only make it faster)
    "bf16": _Need(("amx_bf16", "avx512_bf16"), "bf16 would be emulated in fp32 (far slower than fp32 itself)"),
    "f16": _Need(("amx_fp16", "avx512_fp16"), "f16 would be converted to fp32 op by op"),
    "int8": _Need(("amx_int8", "avx512_vnni"), "int8 would run without dot-product instructions"),
}


def _canonical(precision: str) -> str:
    return {"f32": "fp32", "fp16": "f16", "i8": "int8"}.get(precision, precision)


def parse_cpuinfo(text: str, isa_cap: str | None = None) -> CpuInfo:
    """CpuInfo of a /proc/cpuinfo text (the first processor's entry), with the flags above `isa_cap` dropped.
    ValueError for an ISA name oneDNN does not know."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = " ".join(value.split())
        elif key == "flags" and not flags:
            flags = set(value.split())
    kept = [f for f in FLAGS if f in flags]
    if isa_cap:
        allowed = ISA_CAPS.get(isa_cap.strip().lower())
        if allowed is None:
            raise ValueError(f"ONEDNN_MAX_CPU_ISA={isa_cap!r} is not an ISA oneDNN knows; expected one of "
                             f"{', '.join(name.upper() for name in ISA_CAPS)}")
        kept = [f for f in kept if f in allowed]
    return CpuInfo(model_name=model, flags=kept, isa_cap=isa_cap.strip().upper() if isa_cap else None)


def detect(cpuinfo: Path = CPUINFO, environ: dict[str, str] | None = None) -> CpuInfo:
    """This machine's CpuInfo (honouring ONEDNN_MAX_CPU_ISA); an unreadable cpuinfo gives no flags, so nothing
    beyond fp32 is claimed to run natively."""
    environ = os.environ if environ is None else environ
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, environ.get("ONEDNN_MAX_CPU_ISA") or None)
