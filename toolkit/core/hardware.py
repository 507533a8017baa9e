"""This CPU: model, usable cores and the instruction-set flags that pick kernels (standard library only).

Both sides use it: training picks bf16 from it, sessions refuse bf16 where it would be emulated.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CpuInfo:
    model: str
    logical_cpus: int
    usable_cpus: int
    flags: frozenset[str] = field(default_factory=frozenset)
    vendor: str = ""  # cpuid vendor: GenuineIntel | AuthenticAMD
    family: int | None = None  # cpuid family and model: virtual machines often hide the model name's number
    model_number: int | None = None

    @property
    def generation(self) -> str | None:
        """The microarchitecture where the cpuid family and model tell it (EPYC Zen 4 and Zen 5 both read
        'AMD EPYC' inside many virtual machines), else None."""
        if self.vendor == "AuthenticAMD" and self.family == 26:
            return "Zen 5"
        if self.vendor == "AuthenticAMD" and self.family == 25:
            return "Zen 4" if self.avx512 else "Zen 3"  # Zen 3 has no AVX-512
        if self.vendor == "GenuineIntel" and self.family == 6:
            return INTEL_MODELS.get(self.model_number)
        return None

    @property
    def name(self) -> str:
        """The model name, with the generation when the name alone does not carry it."""
        gen = self.generation
        return f"{self.model} ({gen})" if gen and gen.lower() not in self.model.lower() else self.model

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products in one instruction (AVX512-VNNI, AVX-VNNI or AMX): no u8 x s8 saturation."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def fast_bf16(self) -> bool:
        """bf16 matrix units worth using for autocast (AMX or AVX512-BF16)."""
        return self.amx or self.avx512_bf16

    @property
    def tag(self) -> str:
        """A short file-name tag for recorded results: the model (and generation), lower-case, and the usable
        CPU count."""
        import re

        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")[:40] + f"-{self.usable_cpus}cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "generation": self.generation,
            "cpuid": {"vendor": self.vendor, "family": self.family, "model": self.model_number},
            "logical_cpus": self.logical_cpus,
            "usable_cpus": self.usable_cpus,
            "avx2": "avx2" in self.flags,
            "avx512": self.avx512,
            "avx512_vnni": "avx512_vnni" in self.flags,
            "avx_vnni": "avx_vnni" in self.flags,
            "avx512_bf16": self.avx512_bf16,
            "amx": self.amx,
        }


# Server parts with AVX-512 that a cloud VM may present as a bare "Intel Xeon Processor"
INTEL_MODELS = {85: "Skylake/Cascade Lake", 106: "Ice Lake", 143: "Sapphire Rapids", 207: "Emerald Rapids",
                173: "Granite Rapids"}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), set()
    ids: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key in ("vendor_id", "cpu family", "model") and key not in ids:
                    ids[key] = value.strip()
    except OSError:
        pass
    number = {k: int(v) for k, v in ids.items() if k != "vendor_id" and v.isdigit()}
    return CpuInfo(model=model, logical_cpus=os.cpu_count() or 1, usable_cpus=usable_cpus(), flags=frozenset(flags),
                   vendor=ids.get("vendor_id", ""), family=number.get("cpu family"), model_number=number.get("model"))
