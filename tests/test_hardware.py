"""The CPU description every recorded figure carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.hardware import CpuInfo, cpu_info

AVX512 = frozenset({"avx2", "avx512f", "avx512_vnni"})


@pytest.mark.parametrize("vendor, family, model, flags, generation", [
    ("AuthenticAMD", 26, 2, AVX512, "Zen 5"),
    ("AuthenticAMD", 25, 17, AVX512, "Zen 4"),
    ("AuthenticAMD", 25, 1, frozenset({"avx2"}), "Zen 3"),
    ("GenuineIntel", 6, 143, AVX512 | {"amx_tile", "amx_bf16"}, "Sapphire Rapids"),
    ("GenuineIntel", 6, 1, AVX512, None),  # a model number we do not know is not guessed
    ("", None, None, frozenset(), None),  # no cpuid fields (another OS or architecture)
])
def test_generation_comes_from_cpuid_family_and_model(vendor, family, model, flags, generation):
    cpu = CpuInfo("AMD EPYC" if vendor == "AuthenticAMD" else "Intel Xeon Processor", 2, 2, flags, vendor, family, model)
    assert cpu.generation == generation
    assert cpu.name == (f"{cpu.model} ({generation})" if generation else cpu.model)
    assert cpu.to_dict()["name"] == cpu.name
    assert cpu.to_dict()["cpuid"] == {"vendor": vendor, "family": family, "model": model}


def test_name_does_not_repeat_a_generation_the_model_name_carries():
    cpu = CpuInfo("AMD EPYC 9R45 Zen 5", 2, 2, AVX512, "AuthenticAMD", 26, 2)
    assert cpu.name == "AMD EPYC 9R45 Zen 5"
    assert cpu.tag == "amd-epyc-9r45-zen-5-2cpu"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo on this OS")
def test_reads_this_machines_cpuid_fields():
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    first = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    cpu = cpu_info()
    assert cpu.vendor == first.get("vendor_id", "")
    assert cpu.family == (int(first["cpu family"]) if "cpu family" in first else None)
    assert cpu.model_number == (int(first["model"]) if first.get("model", "").isdigit() else None)
    assert cpu.tag.endswith(f"-{cpu.usable_cpus}cpu")
