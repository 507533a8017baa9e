"""Which libraries this process has, by distribution name: the versions every record embeds (checkpoint,
export, benchmark, optimize) and `rtk doctor` prints. Reads package metadata only: nothing is imported."""

from __future__ import annotations

import importlib.metadata as md
import platform

LIBRARIES = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "numpy", "pillow", "click")


def version_of(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        versions[name] = version_of(name)
    packages = ort_packages()
    if len(packages) > 1 or packages == ["onnxruntime-gpu"]:
        # several onnxruntime packages share one import name: say which ones, GPU build first
        versions["onnxruntime"] = ", ".join(f"{n} {version_of(n)}" for n in sorted(packages, key=lambda n: n != "onnxruntime-gpu"))
    return versions


def ort_packages() -> list[str]:
    """Installed onnxruntime distributions; two at once shadow each other's files."""
    names = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
    return [n for n in names if version_of(n)]
