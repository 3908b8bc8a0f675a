"""CPU detection from recorded /proc/cpuinfo samples (tests/engines/cpuinfo/), and the ONEDNN_MAX_CPU_ISA cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.cpu import detect, parse_cpuinfo

SAMPLES = Path(__file__).parent / "cpuinfo"


def sample(name: str, cap: str | None = None):
    return detect(SAMPLES / f"{name}.txt", {"ONEDNN_MAX_CPU_ISA": cap} if cap else {})


@pytest.mark.parametrize(("name", "model", "flags"), [
    ("xeon-sapphire-rapids-amx", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
     ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8"]),
    ("xeon-cascade-lake-vnni", "Intel(R) Xeon(R) Platinum 8272CL CPU @ 2.60GHz", ["avx2", "avx512f", "avx512_vnni"]),
    ("xeon-haswell-avx2", "Intel(R) Xeon(R) CPU E5-2673 v3 @ 2.40GHz", ["avx2"]),
    ("amd-epyc-zen4", "AMD EPYC", ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]),
])
def test_model_name_and_the_flags_that_matter(name, model, flags):
    cpu = sample(name)
    assert cpu.model_name == model
    assert cpu.flags == flags
    assert cpu.isa_cap is None


@pytest.mark.parametrize(("name", "native"), [
    ("xeon-sapphire-rapids-amx", {"fp32", "bf16", "f16", "int8"}),
    ("xeon-cascade-lake-vnni", {"fp32", "int8"}),
    ("xeon-haswell-avx2", {"fp32"}),
    ("amd-epyc-zen4", {"fp32", "bf16", "int8"}),
])
def test_which_precisions_run_natively(name, native):
    cpu = sample(name)
    assert {p for p in ("fp32", "bf16", "f16", "int8") if cpu.can_run_natively(p)[0]} == native


def test_the_reason_names_what_is_missing():
    ok, why = sample("xeon-haswell-avx2").can_run_natively("bf16")
    assert not ok
    assert "bf16 needs AMX_BF16 or AVX512_BF16" in why and "E5-2673" in why and "emulated" in why
    ok, how = sample("xeon-sapphire-rapids-amx").can_run_natively("bf16")
    assert ok and "AMX_BF16" in how


def test_onednn_isa_cap_drops_the_units_above_it():
    capped = sample("xeon-sapphire-rapids-amx", "AVX512_CORE_VNNI")
    assert capped.flags == ["avx2", "avx512f", "avx512_vnni"]
    assert capped.isa_cap == "AVX512_CORE_VNNI"
    ok, why = capped.can_run_natively("bf16")
    assert not ok and "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI" in why
    assert capped.can_run_natively("int8")[0]
    assert sample("xeon-sapphire-rapids-amx", "AVX512_CORE_AMX").can_run_natively("bf16")[0]
    assert sample("xeon-sapphire-rapids-amx", "ALL").flags == sample("xeon-sapphire-rapids-amx").flags


def test_an_unknown_isa_cap_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA='AVX9000' is not an ISA oneDNN knows"):
        sample("amd-epyc-zen4", "AVX9000")


def test_unreadable_cpuinfo_claims_only_fp32(tmp_path):
    cpu = detect(tmp_path / "missing", {})
    assert cpu.flags == [] and cpu.model_name == "unknown"
    assert cpu.can_run_natively("fp32")[0] and not cpu.can_run_natively("bf16")[0]


def test_unknown_precision_is_a_value_error():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        parse_cpuinfo("").can_run_natively("fp8")


def test_this_machine_is_detected():
    cpu = detect()
    assert cpu.model_name and isinstance(cpu.flags, list)
