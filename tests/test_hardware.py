"""The CPU description every recorded figure carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.core.hardware import CpuInfo, cpu_info

pytestmark = pytest.mark.serving

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


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Another CPU
flags\t\t: fpu sse
"""


def test_reads_the_first_cpus_cpuid_fields(monkeypatch, tmp_path):
    """A known /proc/cpuinfo: the first CPU's vendor, family, model number, name and flags; `model` (a number)
    is not confused with `model name`."""
    import builtins

    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO)
    real_open = builtins.open
    monkeypatch.setattr("toolkit.core.hardware.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k),
                        raising=False)
    monkeypatch.setattr("toolkit.core.hardware.platform.processor", lambda: "")
    cpu = cpu_info()
    assert (cpu.vendor, cpu.family, cpu.model_number) == ("AuthenticAMD", 25, 17)
    assert cpu.model == "AMD EPYC 9R14 96-Core Processor" and cpu.generation == "Zen 4"
    assert cpu.flags == frozenset({"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
    fake.write_text("processor\t: 0\nmodel\t\t: unknown\n")  # no vendor or family, a model that is not a number
    cpu = cpu_info()
    assert (cpu.vendor, cpu.family, cpu.model_number, cpu.generation) == ("", None, None, None)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo on this OS")
def test_reads_this_machines_cpuid_fields():
    cpu = cpu_info()
    assert cpu.tag.endswith(f"-{cpu.usable_cpus}cpu") and 1 <= cpu.usable_cpus <= cpu.logical_cpus
    if cpu.vendor in ("AuthenticAMD", "GenuineIntel"):  # x86: cpuid family and model are always there
        assert cpu.family is not None and cpu.model_number is not None and cpu.flags
