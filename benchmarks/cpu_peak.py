"""This CPU's matrix-engine peaks, for the plans table's "fraction of peak" column.

Peak = FLOP (or int8 ops) per core per cycle of the unit a precision runs on × cores used × clock. The per-cycle
rates are the vendors' published widths, not measurements:

| unit | Intel Xeon (2 × 512-bit FMA ports) | AMD Zen 4 (AVX-512 on 2 × 256-bit pipes) | Zen 5 / AVX2-only |
|---|---|---|---|
| fp32 FMA | 64 | 32 | 64 / 32 |
| AVX512-BF16 (vdpbf16ps) | 128 | 64 | 128 / – |
| AVX512-VNNI int8 (vpdpbusd) | 256 | 128 | 256 / – |
| AMX bf16 / int8 | 1024 / 2048 | – | – |

A precision without its unit falls back: bf16 without AVX512-BF16 or AMX is emulated in fp32 (the fp32 peak), int8
without VNNI runs on AVX2 (taken as 2× the fp32 rate). The clock is lscpu's "CPU max MHz" where the machine
reports one, else /proc/cpuinfo's "cpu MHz" (a current reading; virtual machines often report only that); the
source is recorded beside the figure. Flags are read from /proc/cpuinfo, so a recorded sample can be replayed.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx512_fp16", "avx2", "fma")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    family: int
    flags: frozenset[str] = field(default_factory=frozenset)
    mhz: float = 0.0
    mhz_source: str = "unknown"

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def describe(self) -> str:
        shown = " ".join(f for f in FLAGS if f in self.flags) or "none of " + " ".join(FLAGS)
        return (f"{self.model} ({self.vendor}, family {self.family}); flags: {shown}; "
                f"clock {self.mhz:.0f} MHz ({self.mhz_source})")


def read_cpu(cpuinfo: str | None = None, lscpu: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (and `lscpu` for the max clock); pass texts to replay a recorded machine."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    if lscpu is None:
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu = ""
    first = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    mhz, source = _max_mhz(lscpu), "lscpu CPU max MHz"
    if not mhz:
        mhz, source = float(first.get("cpu MHz") or 0.0), "/proc/cpuinfo cpu MHz (current)"
    return CpuInfo(model=first.get("model name", "unknown"), vendor=first.get("vendor_id", "unknown"),
                   family=int(first.get("cpu family") or 0), flags=frozenset(first.get("flags", "").split()),
                   mhz=mhz, mhz_source=source)


def _max_mhz(lscpu: str) -> float:
    found = re.search(r"^CPU max MHz:\s*([\d.]+)", lscpu or "", re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def per_cycle(cpu: CpuInfo) -> dict[str, tuple[str, int]]:
    """precision ('fp32', 'bf16', 'int8') -> (the unit it runs on, FLOP or ops per core per cycle)."""
    half = cpu.vendor == "AuthenticAMD" and cpu.family == 0x19  # Zen 4: AVX-512 split over 256-bit pipes
    if cpu.has("avx512f"):
        fp32 = ("AVX-512 fp32 FMA", 32 if half else 64)
    else:
        fp32 = ("AVX2 fp32 FMA", 32 if cpu.has("fma") else 16)
    if cpu.has("amx_bf16"):
        bf16 = ("AMX bf16", 1024)
    elif cpu.has("avx512_bf16"):
        bf16 = ("AVX512-BF16", 64 if half else 128)
    else:
        bf16 = (f"{fp32[0]} (bf16 emulated)", fp32[1])
    if cpu.has("amx_int8"):
        int8 = ("AMX int8", 2048)
    elif cpu.has("avx512_vnni"):
        int8 = ("AVX512-VNNI int8", 128 if half else 256)
    else:
        int8 = ("AVX2 int8", 2 * fp32[1])
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


def peak_gflops(cpu: CpuInfo, precision: str, cores: int) -> tuple[str, float]:
    """(unit, peak GFLOP/s) of `precision` on `cores` cores at the recorded clock."""
    unit, rate = per_cycle(cpu)[precision]
    return unit, rate * cores * cpu.mhz / 1e3
