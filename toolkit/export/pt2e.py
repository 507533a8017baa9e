"""PyTorch-native int8: PT2E static quantisation with torchao's x86 Inductor quantizer.

`quantized_program` turns rtk's ImageClassifier (uint8 NHWC in, preprocessing in the graph) into an
ExportedProgram holding quantize/dequantize pairs around the convolutions and the classifier; Inductor
fuses them into int8 kernels when it compiles the program (AOTInductor, with freezing on:
`aoti_compile_and_package(program, inductor_configs={"freezing": True})`). Without freezing Inductor
keeps the q/dq ops as separate float kernels, slower than fp32.

Needs torch and torchao (`pip install -e '.[torch-int8]'`); both are imported lazily.
"""

from __future__ import annotations

import copy
import importlib.metadata
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolkit.errors import RtkError

# torchao 0.18 is the oldest release that works with torch 2.14 (which no longer ships
# torch.ao.quantization.quantize_pt2e): measured, 0.15 fails at import, 0.16 and 0.17 in convert_pt2e.
MIN_TORCHAO = (0, 18)
INSTALL_HINT = "pip install -e '.[torch-int8]'"
CALIBRATION_BATCH = 8
# what Inductor needs to turn the q/dq pairs into int8 kernels (it constant-folds the quantised weights)
INDUCTOR_CONFIGS = {"freezing": True}


@dataclass(frozen=True)
class Pt2eRecipe:
    """The quantizer setting (recorded in the manifest with asdict). The default is torchao's
    `get_default_x86_inductor_quantization_config()`: u8 activations with static per-tensor ranges from
    calibration (histogram observer), s8 weights per output channel."""

    quantizer: str = "x86_inductor"
    activations: str = "u8"
    weights: str = "s8"
    per_channel: bool = True
    calibration: str = "histogram"
    is_dynamic: bool = False  # True: activation ranges measured per batch at run time, no calibration
    reduce_range: bool = False  # 7-bit activations, for CPUs whose u8 x s8 kernels saturate

    def quantizer_object(self):
        """torchao's X86InductorQuantizer set to this recipe."""
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
            is_dynamic=self.is_dynamic, reduce_range=self.reduce_range))
        return quantizer


def pt2e_problem() -> str | None:
    """Why PT2E int8 cannot be built here (None when it can)."""
    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return f"PyTorch-native int8 needs torchao, which is not installed: {INSTALL_HINT}"
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TORCHAO:
        return (f"PyTorch-native int8 needs torchao >= {'.'.join(map(str, MIN_TORCHAO))}, this is {version}: "
                f"{INSTALL_HINT}")
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as exc:
        return f"torchao {version} lacks the pt2e quantizer ({exc}): {INSTALL_HINT}"
    return None


# ---------------------------------------------------------------- one ReLU per call


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_out(out + identity)


def _bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu_mid(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu_out(out + identity)


def split_relus(module: nn.Module) -> nn.Module:
    """A deep copy in which every ReLU call of a torchvision BasicBlock / Bottleneck has its own module.

    The blocks call one `self.relu` two or three times; the exported graph then gives that module's
    partition several outputs and prepare_pt2e refuses it ("Input partition has more than one output
    node"). The arithmetic is unchanged."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    module = copy.deepcopy(module)
    for block in module.modules():
        if isinstance(block, BasicBlock):
            block.relu_out = nn.ReLU()
            block.forward = types.MethodType(_basic_block_forward, block)
        elif isinstance(block, Bottleneck):
            block.relu_mid, block.relu_out = nn.ReLU(), nn.ReLU()
            block.forward = types.MethodType(_bottleneck_forward, block)
    return module


# ---------------------------------------------------------------- the steps


def check_crops(crops: np.ndarray, example: torch.Tensor) -> None:
    """Calibration crops must be uint8 [N, S, S, 3] of the example's crop size, N >= 1."""
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8:
        kind = crops.dtype if isinstance(crops, np.ndarray) else type(crops).__name__
        raise RtkError(f"calibration crops must be a uint8 numpy array (decoded crops), not {kind}")
    expected = tuple(example.shape[1:])
    if crops.ndim != 4 or crops.shape[0] == 0:
        raise RtkError(f"calibration needs at least one crop [N, {', '.join(map(str, expected))}], got shape "
                       f"{list(crops.shape)}")
    if tuple(crops.shape[1:]) != expected:
        raise RtkError(f"calibration crops are {list(crops.shape[1:])}, the model takes {list(expected)} "
                       f"(its crop size): decode them with the model's preprocessing")


def export_dynamic(module: nn.Module, example: torch.Tensor, batch_max: int) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, as `write_pt2` exports the fp32 graph."""
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    return torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})


def prepare(module: nn.Module, example: torch.Tensor, recipe: Pt2eRecipe, batch_max: int) -> torch.fx.GraphModule:
    """Export, then insert the quantizer's observers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    graph = export_dynamic(split_relus(module).eval(), example, batch_max).module()
    return prepare_pt2e(graph, recipe.quantizer_object())


def calibrate(prepared: Callable[[torch.Tensor], torch.Tensor], crops: np.ndarray,
              batch: int = CALIBRATION_BATCH) -> None:
    """Run the crops through the observers, `batch` at a time."""
    with torch.no_grad():
        for start in range(0, len(crops), batch):
            prepared(torch.from_numpy(np.ascontiguousarray(crops[start : start + batch])))


def drop_unused_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the float weights convert_pt2e leaves behind next to their int8 copies.

    The graph no longer reads them, but torch.export lifts every parameter of the module, so the program
    (and a package compiled from it) would carry the fp32 model too."""
    graph.graph.eliminate_dead_code()
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    graph.recompile()
    return graph


def quantized_program(module: nn.Module, example: torch.Tensor, crops: np.ndarray, batch_max: int = 65536,
                      recipe: Pt2eRecipe = Pt2eRecipe()) -> torch.export.ExportedProgram:
    """The PT2E int8 ExportedProgram of `module` (an ImageClassifier), calibrated on `crops`, batch dynamic:
    what `torch._inductor.aoti_compile_and_package(program, inductor_configs=INDUCTOR_CONFIGS)` takes."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    problem = pt2e_problem()
    if problem:
        raise RtkError(problem)
    check_crops(crops, example)
    prepared = prepare(module, example, recipe, batch_max)
    calibrate(prepared, crops)
    converted = drop_unused_weights(convert_pt2e(prepared))
    return export_dynamic(converted, example, batch_max)


QUANT_OPS = ("quantize_per_tensor", "quantize_per_channel", "dequantize_per_tensor", "dequantize_per_channel")


def quant_op_counts(program: torch.export.ExportedProgram) -> dict[str, int]:
    """How many quantize/dequantize calls the program holds, by op name (empty: nothing was quantised)."""
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if name in QUANT_OPS:
                counts[name] = counts.get(name, 0) + 1
    return counts
