"""AOTInductor packages: the exported graph compiled ahead of time into native code (a zip holding a shared
library with the weights inside, its C++ sources and a metadata json).

`write_aoti` exports the module with a dynamic batch (as model.pt2 is) and compiles it; `compile_package`
is the compile step alone, for a writer that builds its own program (the PT2E int8 one). The rtk metadata
goes into the package's own metadata (`aot_inductor.metadata`), which AOTInductor writes as a json member:
the loader and verify read it from the zip without loading the library.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import RtkError, first_line

MAX_BATCH = 65536  # the batch bound of the exported graph, as for model.pt2


class Bfloat16Network(nn.Module):
    """The network in bfloat16 behind the fp32 preprocessing: the input is cast down, the caller casts the
    logits back (ImageClassifier does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16))


def export_program(module: nn.Module, example: torch.Tensor):
    """torch.export of `module` with the batch dimension dynamic (1 to MAX_BATCH)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})


def compile_package(program, path: Path, meta: dict[str, str]) -> None:
    """Compile an ExportedProgram into an AOTInductor package at `path`, weights frozen into the library and
    `meta` (string values) stored as the package's metadata. GPU kernels are embedded in the library too, so
    a package is its one library (plus sources and metadata): what the loader's member check expects."""
    from toolkit.core.fileio import naming

    configs = {"freezing": True, "aot_inductor.embed_kernel_binary": True,
               "aot_inductor.metadata": {k: str(v) for k, v in meta.items()}}
    with naming(path):
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        except OSError:
            raise
        except Exception as exc:  # a compiler error is many lines of C++: the first one says what failed
            raise RtkError(f"{path.name}: AOTInductor cannot compile it: {first_line(exc)}") from None


def write_aoti(module: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, str], device: str = "cpu") -> None:
    """Export `module` (uint8 NHWC in, logits out) with a dynamic batch and compile it for `device` (cpu,
    cuda): a package runs only on the device it was compiled for. A bf16 package is the same call on a module
    whose network is a `Bfloat16Network`. The module is back on the CPU afterwards."""
    try:
        compile_package(export_program(module.to(device), example.to(device)), path, meta)
    finally:
        module.to("cpu")
